"""Contract of the robomimic env (robosuite 1.5) and its scripted experts. Run with ``pytest -m sim``."""
from __future__ import annotations

import numpy as np
import pytest

from envs.robomimic import OBS_KEYS, TASKS

sim = pytest.mark.sim
OBJECT_DIM = {"lift": 10, "can": 14, "square": 14, "nut_assembly": 28, "pick_place": 56, "two_cubes": 20}


def test_unknown_task_lists_known_ones():
    from envs.robomimic import RobomimicEnv

    with pytest.raises(ValueError, match=r"unknown robomimic task 'stack'.*\['can', 'lift', 'nut_assembly', 'pick_place', 'square', "
                       r"'two_cubes'\]"):
        RobomimicEnv("stack")


@pytest.fixture(scope="module")
def lift_env():
    from envs import make_env

    env = make_env("robomimic", task="lift")
    yield env
    env.close()


def _assert_obs_matches_space(env, obs):
    from envs.objects import object_keys

    assert set(obs) == set(OBS_KEYS) | set(object_keys(env.task)) == set(env.observation_space.spaces)
    _assert_in_space(env, obs)


def _assert_in_space(env, obs):
    for k, v in obs.items():
        space = env.observation_space[k]
        if k == "instruction":
            assert isinstance(v, str) and v
            continue
        assert isinstance(v, np.ndarray) and v.dtype == (np.uint8 if k.endswith("_image") else np.float32), k
        assert v.shape == space.shape, (k, v.shape, space.shape)
    assert env.observation_space.contains(obs)


@sim
@pytest.mark.parametrize("task", sorted(TASKS))
def test_spaces_and_step(task):
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv(task, horizon=3)
    try:
        assert env.observation_space["object"].shape == (OBJECT_DIM[task],)
        assert env.action_space.shape == (7,) and env.action_space.dtype == np.float32
        assert env.max_episode_steps == 3 and env.task == task
        obs, info = env.reset(seed=0)
        _assert_obs_matches_space(env, obs)
        # the per-object keys are robosuite's object observables grouped by object, in object-state's order
        from envs.objects import OBJECT_STATE, OBJECTS, object_keys

        raw = env._env._get_observations(force_update=True)
        names = [k for k, o in env._env._observables.items() if o.modality == "object" and o.is_enabled() and o.is_active()]
        if task in OBJECT_STATE:  # gathered from the observables it names (test_two_cubes_...: Lift's layout)
            names = list(OBJECT_STATE[task])
        ours = obs["object"] != 0  # at reset robosuite's object-to-eef values are still zero
        assert ours.sum() >= 3 * len(OBJECTS[task])
        assert np.allclose(np.concatenate([np.ravel(raw[k]) for k in names])[ours], obs["object"][ours], atol=1e-6)
        owners = [n.replace("gripper_to_", "").split("_to_")[0].rsplit("_", 1)[0].lower() for n in names]
        grouped = [(o, sum(np.size(raw[n]) for n, oo in zip(names, owners) if oo == o)) for o in dict.fromkeys(owners)]
        if task not in OBJECT_STATE:  # robosuite's object names are ours
            assert [(name.replace("_", ""), w) for name, w in OBJECTS[task]] == [(o, w) for o, w in grouped]
        assert [w for _, w in grouped] == [w for _, w in OBJECTS[task]]
        assert np.array_equal(np.concatenate([obs[k] for k in object_keys(task)]), obs["object"])
        assert "is_success" in info
        for t in range(3):
            obs, reward, terminated, truncated, info = env.step(np.zeros(7, np.float32))
            _assert_obs_matches_space(env, obs)
            assert isinstance(info["is_success"], bool) and terminated == info["is_success"]
            assert truncated == (t == 2)
        meta = env.env_meta()
        assert meta["env_name"] == TASKS[task] and meta["type"] == 1
        assert meta["env_kwargs"]["horizon"] == 3 and meta["env_kwargs"]["control_freq"] == 20
    finally:
        env.close()


@sim
@pytest.mark.parametrize(
    "action, match",
    [
        (np.zeros(6), r"shape \(7,\)"),
        (np.zeros((1, 7)), r"shape \(7,\)"),
        (np.array([0, 0, np.nan, 0, 0, 0, 0]), "finite"),
        (np.array([0, 0, 0, 0, 0, np.inf, 0]), "finite"),
    ],
)
def test_action_validation(lift_env, action, match):
    lift_env.reset(seed=0)
    with pytest.raises(ValueError, match=match):
        lift_env.step(action)


@sim
def test_out_of_range_actions_are_clipped(lift_env):
    a = np.array([3.0, -2.0, 0.5, 0, 0, 0, 5.0])
    lift_env.reset(seed=5)
    obs_big = lift_env.step(a)[0]
    lift_env.reset(seed=5)
    obs_clipped = lift_env.step(np.clip(a, -1, 1))[0]
    for k in OBS_KEYS:
        np.testing.assert_array_equal(obs_big[k], obs_clipped[k])


def _rollout(env, seed, actions):
    obs, _ = env.reset(seed=seed)
    traj = [obs]
    for a in actions:
        traj.append(env.step(a)[0])
    return {k: np.stack([o[k] for o in traj]) for k in OBS_KEYS}


@sim
@pytest.mark.parametrize("task", sorted(TASKS))
def test_seeded_reset_reproduces_exactly(task):
    """Same seed: identical episode, whatever ran before (and in a fresh env); other seed: different scene."""
    from envs.robomimic import RobomimicEnv

    actions = np.random.default_rng(0).uniform(-1, 1, size=(10, 7))
    env = RobomimicEnv(task)
    try:
        a = _rollout(env, 7, actions)
        _rollout(env, 8, actions[:3])  # disturb the rngs in between
        b = _rollout(env, 7, actions)
        c = _rollout(env, 8, actions)
    finally:
        env.close()
    fresh = RobomimicEnv(task)
    try:
        d = _rollout(fresh, 7, actions)
    finally:
        fresh.close()
    for k in OBS_KEYS:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        np.testing.assert_array_equal(a[k], d[k], err_msg=k)
    assert not np.allclose(a["object"][0], c["object"][0])  # object placement differs
    assert not np.allclose(a["robot0_eef_pos"][0], c["robot0_eef_pos"][0])  # robot init noise differs


@sim
def test_unseeded_resets_follow_the_first_seed(lift_env):
    lift_env.reset(seed=11)
    first = lift_env.reset()[0]
    lift_env.reset(seed=11)
    again = lift_env.reset()[0]
    np.testing.assert_array_equal(first["object"], again["object"])


@sim
def test_render_rgb_array():
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv("lift", render_mode="rgb_array", render_size=64)
    try:
        env.reset(seed=0)
        frame = env.render()
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        # the right way up: the agentview camera sees the table (lower half) below the background
        assert frame.std() > 0
        assert env.env_meta()["env_kwargs"]["has_offscreen_renderer"] is True
    finally:
        env.close()


@sim
@pytest.mark.parametrize("task", sorted(TASKS))
def test_expert_succeeds(task):
    from envs.experts import make_expert
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv(task)
    expert = make_expert(task, env)
    successes = 0
    try:
        for seed in range(3):
            obs, _ = env.reset(seed=seed)
            expert.reset()
            for _ in range(env.max_episode_steps):
                obs, _, terminated, truncated, info = env.step(expert.act(obs))
                if terminated or truncated:
                    break
            successes += info["is_success"]
    finally:
        env.close()
    assert successes >= 2, f"{task}: expert succeeded on {successes}/3 seeds"


@sim
def test_language_and_cameras():
    """Images and an instruction beside the low-dim state, which they leave as it was; goal and phrasing follow
    the seed; an explicit goal is obeyed, an unknown one refused."""
    from envs.language import phrasings
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv("nut_assembly", cameras=("agentview", "robot0_eye_in_hand"), image_size=32, language=True,
                       instructions="heldout")
    plain = RobomimicEnv("nut_assembly")
    try:
        assert set(env.observation_space.spaces) == {*OBS_KEYS, "agentview_image", "robot0_eye_in_hand_image",
                                                     "instruction", "object_square_nut", "object_round_nut"}
        goals = set()
        for seed in range(6):
            obs, info = env.reset(seed=seed)
            _assert_in_space(env, obs)
            assert obs["agentview_image"].shape == (32, 32, 3) and obs["agentview_image"].std() > 0
            assert obs["instruction"] in phrasings("nut_assembly", info["goal"], "heldout")
            goals.add(info["goal"])
            ref, _ = plain.reset(seed=seed)
            for k in OBS_KEYS:
                np.testing.assert_array_equal(obs[k], ref[k], err_msg=k)
            again, info2 = env.reset(seed=seed)
            assert again["instruction"] == obs["instruction"] and info2["goal"] == info["goal"]
            np.testing.assert_array_equal(again["agentview_image"], obs["agentview_image"])
        assert goals == {"round", "square"}
        obs, info = env.reset(seed=0, options={"goal": "square"})
        assert info["goal"] == "square" and obs["instruction"] in phrasings("nut_assembly", "square", "heldout")
        obs, _, _, _, info = env.step(np.zeros(7, np.float32))
        _assert_in_space(env, obs)
        assert info == {"is_success": False, "goal": "square", "placed": [], "handled": []}
        with pytest.raises(ValueError, match="task 'nut_assembly' has no goal 'milk'"):
            env.reset(seed=0, options={"goal": "milk"})
        meta = env.env_meta()
        assert meta["env_kwargs"]["camera_names"] == ["agentview", "robot0_eye_in_hand"]
        assert meta["wrapper"]["language"] is True and meta["wrapper"]["task"] == "nut_assembly"
    finally:
        env.close()
        plain.close()
    with pytest.raises(ValueError, match="unknown camera"):
        RobomimicEnv("lift", cameras=("frontview_wide",))
    with pytest.raises(ValueError, match="instructions must be one of"):
        RobomimicEnv("lift", instructions="test")


@sim
def test_resets_with_cameras_do_not_grow_memory():
    """robosuite's hard reset leaves the old sim and render contexts in reference cycles holding native buffers
    (about 120 MB a reset with two cameras); the env collects them, so many episodes fit in memory."""
    from envs.robomimic import RobomimicEnv

    def rss_mb() -> float:
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    env = RobomimicEnv("lift", cameras=("agentview", "robot0_eye_in_hand"), image_size=84)
    try:
        for seed in range(3):
            env.reset(seed=seed)
        start = rss_mb()
        for seed in range(12):
            env.reset(seed=seed)
        assert rss_mb() - start < 300, f"12 resets grew the process by {rss_mb() - start:.0f} MB"
    finally:
        env.close()


@sim
@pytest.mark.parametrize("task", ["nut_assembly", "pick_place", "two_cubes"])
def test_expert_handles_the_named_object(task):
    """For every goal of a multi-object scene the expert places the named object, and no other."""
    from envs.experts import make_expert
    from envs.language import goals
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv(task)
    expert = make_expert(task, env)
    try:
        for goal in goals(task):
            done = False
            for seed in range(2):  # the scripted PickPlace expert misses one episode in five
                obs, _ = env.reset(seed=seed, options={"goal": goal})
                expert.reset()
                for _ in range(env.max_episode_steps):
                    obs, _, terminated, truncated, info = env.step(expert.act(obs))
                    if terminated or truncated:
                        break
                assert set(info["placed"]) <= {goal} and set(info["handled"]) <= {goal}, (goal, info)
                if info["is_success"]:
                    assert info["placed"] == [goal] and info["handled"] == [goal]
                    done = True
                    break
            assert done, f"{task}: the expert placed no {goal} in 2 episodes"
    finally:
        env.close()


@sim
def test_two_cubes_counts_only_the_named_cube():
    """Lifting the other cube handles it and places it, but is no success; the cube sits where Lift's does in
    ``object``."""
    from envs.experts import make_expert
    from envs.robomimic import RobomimicEnv

    env = RobomimicEnv("two_cubes")
    try:
        obs, _ = env.reset(seed=3, options={"goal": "red"})
        red, green = env.cube_bodies()
        assert np.allclose(obs["object_red_cube"][:3], env.sim_env.sim.data.body_xpos[red], atol=1e-6)
        assert np.allclose(obs["object_green_cube"][:3], env.sim_env.sim.data.body_xpos[green], atol=1e-6)
        expert = make_expert("two_cubes", env)
        expert._cube_body = lambda: green  # go for the cube the instruction does not name
        lifted = False
        for _ in range(150):
            obs, _, terminated, _, info = env.step(expert.act(obs))
            assert not terminated and not info["is_success"]
            lifted = info["placed"] == ["green"]
            if lifted:
                break
        assert lifted and info["handled"] == ["green"] and info["goal"] == "red", info
        assert np.allclose(obs["object_red_cube"][7:], obs["object_red_cube"][:3] - obs["robot0_eef_pos"], atol=1e-5)
    finally:
        env.close()


def test_make_expert_unknown_task():
    from envs.experts import make_expert

    with pytest.raises(ValueError, match=r"no scripted expert for task 'stack'"):
        make_expert("stack", env=None)


@sim
def test_collect_cli(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    from envs.recorder import read_demos

    spec = importlib.util.spec_from_file_location("collect", Path(__file__).resolve().parents[1] / "eval/collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    main = collect.main

    out = tmp_path / "lift.hdf5"
    assert main(["--task", "lift", "--n-demos", "2", "--out", str(out), "--seed-offset", "5"]) == 0
    assert "expert success rate" in capsys.readouterr().out
    meta, demos = read_demos(out)
    assert meta["env_name"] == "Lift" and [d["seed"] for d in demos] == [5, 6]
    for d in demos:
        assert d["rewards"][-1] == 1.0  # ends holding the cube up
        assert d["actions"].shape == (len(d["rewards"]), 7)
    with pytest.raises(SystemExit):  # refuses to overwrite
        main(["--task", "lift", "--n-demos", "1", "--out", str(out)])


@sim
def test_collect_cli_language_and_images(tmp_path):
    import importlib.util
    from pathlib import Path

    from envs.language import phrasings
    from envs.recorder import read_demos

    spec = importlib.util.spec_from_file_location("collect", Path(__file__).resolve().parents[1] / "eval/collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    out = tmp_path / "nuts.hdf5"
    assert collect.main(["--task", "nut_assembly", "--language", "--cameras", "agentview,robot0_eye_in_hand",
                         "--image-size", "24", "--n-demos", "1", "--out", str(out)]) == 0
    meta, (demo,) = read_demos(out)
    L = len(demo["actions"])
    assert meta["wrapper"]["cameras"] == ["agentview", "robot0_eye_in_hand"]
    assert demo["obs"]["agentview_image"].shape == (L, 24, 24, 3) and demo["obs"]["agentview_image"].dtype == np.uint8
    assert demo["obs"]["robot0_eye_in_hand_image"].shape == (L, 24, 24, 3)
    assert demo["instruction"] in phrasings("nut_assembly", demo["goal"], "train")
    assert "instruction" not in demo["obs"]


def test_rotation_helpers_match_scipy():
    Rotation = pytest.importorskip("scipy.spatial.transform").Rotation
    from envs.experts import _closest_yaw, _quat_xyzw_to_mat, _rotvec

    rng = np.random.default_rng(0)
    rotvecs = [rng.normal(size=3) for _ in range(20)] + [np.array([0.0, 0.0, np.pi - 1e-4]), np.zeros(3)]
    for rv in rotvecs:
        r = Rotation.from_rotvec(rv)
        m = _quat_xyzw_to_mat(r.as_quat())  # scipy quats are xyzw, like robosuite's eef quat
        np.testing.assert_allclose(m, r.as_matrix(), atol=1e-9)
        np.testing.assert_allclose(Rotation.from_rotvec(_rotvec(m)).as_matrix(), m, atol=1e-6)
    assert _closest_yaw(np.pi / 2 + 0.1, 0.0, np.pi / 2) == pytest.approx(0.1)
    assert _closest_yaw(-3.0, 3.0, 2 * np.pi) == pytest.approx(2 * np.pi - 3.0)


@sim
def test_camera_frames_survive_resets():
    """The render context a hard reset replaces is freed with its own GL context current: freed later by the
    garbage collector with the new one current, it deleted the new context's framebuffer (same ids) and every
    frame after it was noise. The same seed renders the same frames on the first episode and after resets."""
    from envs.robomimic import RobomimicEnv

    cams = ("agentview", "robot0_eye_in_hand")
    envs = [RobomimicEnv("lift", cameras=cams, image_size=84) for _ in range(2)]  # two envs share the process's GL

    def episode(env, seed):
        obs, _ = env.reset(seed=seed)
        frames = [obs[f"{c}_image"] for c in cams]
        for _ in range(3):
            obs, *_ = env.step(np.zeros(7))
        return frames + [obs[f"{c}_image"] for c in cams]

    try:
        first = episode(envs[0], 7)
        for seed in range(3):
            for env in envs:
                episode(env, seed)
        again = episode(envs[0], 7)
        for a, b in zip(first, again):
            assert np.abs(a.astype(int) - b.astype(int)).mean() < 1.0, "frames after resets differ from the first episode's"
    finally:
        for env in envs:
            env.close()


@sim
def test_collect_forced_drop_shows_a_regrasp(tmp_path, capsys):
    """``--drop-prob 1``: the gripper is forced open once the expert holds the can; the expert finds it gone and
    grasps again, and the demo (still a success) records the clean labels: close, then open, then close again."""
    import importlib.util
    from pathlib import Path

    import h5py

    spec = importlib.util.spec_from_file_location("collect", Path(__file__).resolve().parents[1] / "eval/collect.py")
    collect = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(collect)
    plain, dropped = tmp_path / "plain.hdf5", tmp_path / "drop.hdf5"
    assert collect.main(["--task", "can", "--n-demos", "1", "--out", str(plain), "--seed-offset", "3"]) == 0
    assert collect.main(["--task", "can", "--n-demos", "1", "--out", str(dropped), "--seed-offset", "3",
                         "--drop-prob", "1"]) == 0
    assert "1 kept demos re-grasp after a forced drop" in capsys.readouterr().out
    with h5py.File(plain, "r") as f:
        assert "drop_at" not in f["data/demo_0"].attrs
        n_plain = len(f["data/demo_0/actions"])
    with h5py.File(dropped, "r") as f:
        g = f["data/demo_0"]
        drop_at, grip = int(g.attrs["drop_at"]), g["actions"][:, -1]
        assert len(grip) > n_plain + 20  # the second grasp takes time
    assert grip[drop_at] == 1.0  # the label says close while the env opens
    after = grip[drop_at:]
    reopen = int(np.argmax(after < 0))
    assert reopen > 0 and (after[reopen:] > 0).any()  # the expert opens, then closes on the can again
    with pytest.raises(SystemExit):
        collect.main(["--task", "can", "--n-demos", "1", "--out", str(tmp_path / "x.hdf5"), "--drop-prob", "2"])
