"""The VLA pipeline end to end on the language toy (envs/toy.py, language=True): demos with an instruction and a
camera image, a few training steps, and rollouts through eval/run.py uncached and with BAC on the expert. Tiny
sizes and the hashed text encoder keep it to seconds; the robosuite scenes run the same code (``-m sim``)."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import eval.collect as collect
import eval.manifest as manifest
import eval.run as run
import eval.train_vla as train_vla
import eval.vla_reuse as vla_reuse
from envs.language import phrasings
from envs.recorder import read_demos
from policies import load_policy
from policies.vla import VLAPolicy
from tests.conftest import compose_cfg

TINY = ["--text-encoder", "hashed", "--image-size", "16", "--cameras", "agentview", "--state-keys", "agent_pos",
        "--vision-channels", "8", "8", "8", "--vision-grid", "2", "--n-emb", "32", "--n-head", "2", "--n-layer", "2",
        "--n-prefix-layers", "1", "--batch-size", "8", "--save-every-s", "0", "--num-inference-steps", "4",
        "--shift", "1", "--warmup", "2"]


def test_language_toy_demos_training_and_rollouts(tmp_path):
    demos = tmp_path / "toy_lang.hdf5"
    assert collect.main(["--task", "toy", "--language", "--cameras", "agentview", "--image-size", "16",
                         "--n-demos", "4", "--out", str(demos)]) == 0
    _, back = read_demos(demos)
    for d in back:
        assert d["obs"]["agentview_image"].shape == (len(d["actions"]), 16, 16, 3)
        assert d["instruction"] in phrasings("toy", d["goal"], "train")

    ckpt = tmp_path / "vla"
    train_vla.main(["--datasets", str(demos), "--out", str(ckpt), "--steps", "3", *TINY])
    policy = load_policy(ckpt)
    assert isinstance(policy, VLAPolicy) and policy.config.state_dims == [2] and policy.config.action_dim == 2
    record = json.loads((ckpt / "train_record.json").read_text())
    assert record["steps"] == 3 and record["n_demos"] == 4 and len(record["datasets"][0]["sha256"]) == 64
    with np.load(ckpt / "calibration" / "calib_obs.npz", allow_pickle=False) as z:
        assert z["instruction"].shape == (4, 2) and z["agentview_image"].dtype == np.uint8

    summaries = {}
    for cache in ("none", "bac"):
        knobs = ["cache.n_updates=2"] if cache == "bac" else []
        cfg = compose_cfg("env=toy_lang", "policy=vla", f"policy.checkpoint={ckpt}", f"cache={cache}", *knobs,
                          "eval.n_episodes=3", "eval.n_envs=3", "eval.latency_trials=2")
        summaries[cache] = s = run.evaluate(cfg, tmp_path / cache)
        assert s["n_episodes"] == 3 and set(s["latency_split_ms"]) == {"prefix", "expert"}
        episodes = [json.loads(line) for line in (tmp_path / cache / "episodes.jsonl").read_text().splitlines()]
        assert len(episodes) == 3 and all(e["outcome"]["goal"] in ("red", "blue") for e in episodes)
        assert s["language"]["n"] == 3 and 0 <= s["language"]["named_placed"] <= 1
    assert summaries["none"]["flops_ratio"] == 1.0 and summaries["bac"]["flops_ratio"] < 1.0
    assert summaries["bac"]["cache_stats"]["schedule"]["method"] == "bac"
    # the manifest of a shipped VLA: its demo files, training and the measured cell with the language stats
    manifest.main(["--checkpoint", str(ckpt), "--summary", str(tmp_path / "none" / "summary.json"),
                   "--collect", "python eval/collect.py --task toy --language ..."])
    m = json.loads((ckpt / "manifest.json").read_text())
    assert m["demos"]["datasets"][0]["sha256"] == record["datasets"][0]["sha256"] and m["training"]["steps"] == 3
    assert m["evaluation"]["language"]["n"] == 3 and "weights" in m
    load_policy(ckpt)  # the weights' hashes kept: it still loads
    # prefix tokens kept across control steps, per stream: recomputing all of them repeats the uncached episodes
    for threshold in (-1, 8):
        cfg = compose_cfg("env=toy_lang", "policy=vla", f"policy.checkpoint={ckpt}", "eval.n_episodes=3",
                          "eval.n_envs=3", "eval.latency_trials=2", f"policy.token_reuse_threshold={threshold}")
        s = run.evaluate(cfg, tmp_path / f"reuse{threshold}")
        frac = s["token_reuse"]["image_tokens_recomputed"]
        if threshold < 0:
            assert frac == 1.0
            assert [e["steps"] for e in _episodes(tmp_path / "reuse-1")] == [e["steps"] for e in _episodes(tmp_path / "none")]
        else:
            assert 0 < frac < 1
    # the offline timing of it on demo replays: recomputing everything is exact
    out = tmp_path / "reuse.json"
    assert vla_reuse.main(["--checkpoint", str(ckpt), "--dataset", str(demos), "--thresholds", "-1", "8",
                           "--n-demos", "2", "--out", str(out)]) == 0
    rows = {r["setting"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["t=-1,age=4"]["image_tokens_recomputed"] == 1.0 and rows["t=-1,age=4"]["action_rel_l2_mean"] < 1e-4
    assert rows["t=8,age=4"]["image_tokens_recomputed"] < 1.0 and rows["plain"]["other_noise_rel_l2_mean"] > 0
    with pytest.raises(ValueError, match="offline loop"):
        run.evaluate(compose_cfg("env=toy_lang", "policy=vla", f"policy.checkpoint={ckpt}", "loop=realtime",
                                 "policy.token_reuse_threshold=8"), tmp_path / "rt")


def _episodes(folder):
    return [json.loads(line) for line in (folder / "episodes.jsonl").read_text().splitlines()]


def test_training_windows_pad_like_diffusion_policy_and_the_shift_keeps_images(tmp_path):
    """Window s of a demo: observations of steps s - (To - 1) .. s clipped at the start, actions of s - (To - 1) ..
    clipped at the end (DP-T's padding); every demo's windows counted; the random shift moves whole images."""
    import torch

    from envs.recorder import DemoWriter
    from policies.vla import VLAConfig

    rng = np.random.default_rng(0)
    path = tmp_path / "d.hdf5"
    with DemoWriter(path, {"env_name": "ToyReach"}) as w:
        for L in (5, 9):
            w.add(obs={"agent_pos": np.arange(L, dtype=np.float32)[:, None].repeat(2, 1),
                       "agentview_image": rng.integers(0, 256, (L, 8, 8, 3), dtype=np.uint8)},
                  actions=np.arange(L, dtype=np.float32)[:, None].repeat(2, 1), instruction="go to the red dot",
                  goal="red")
    c = VLAConfig(cameras=["agentview"], state_keys=["agent_pos"], state_dims=[2], action_dim=2, image_size=8,
                  horizon=8, n_obs_steps=2, n_action_steps=4, text_encoder="hashed")
    data = train_vla.LanguageDemos([str(path)], c)
    assert len(data.windows) == (5 + 4 - 8 + 1) + (9 + 4 - 8 + 1)
    first = data.window(0, 0)
    assert first["state"][:, 0].tolist() == [0, 0] and first["actions"][:, 0].tolist() == [0, 0, 1, 2, 3, 4, 4, 4]
    np.testing.assert_array_equal(first["agentview_image"][0], data.demos[0]["images"]["agentview"][0])
    batch = data.batch(np.array([0, len(data.windows) - 1]))
    assert batch["agentview_image"].shape == (2, 2, 8, 8, 3) and batch["instruction"] == ["go to the red dot"] * 2
    images = torch.from_numpy(batch["agentview_image"])
    shifted = train_vla.random_shift(images, 2, torch.Generator().manual_seed(0))
    assert shifted.dtype == torch.uint8 and shifted.shape == images.shape
    assert torch.equal(train_vla.random_shift(images, 0, torch.Generator()), images)
    with pytest.raises(ValueError, match="holds 8 px images; the policy is configured for 84"):
        train_vla.LanguageDemos([str(path)], VLAConfig(cameras=["agentview"], state_keys=["agent_pos"], state_dims=[2],
                                                       action_dim=2, text_encoder="hashed"))


def _object_demos(path, width: int, instruction: str, n: int = 2, L: int = 12, env_meta: dict | None = None):
    from envs.recorder import DemoWriter

    rng = np.random.default_rng(width)
    with DemoWriter(path, env_meta or {"env_name": "ToyReach"}) as w:
        for _ in range(n):
            w.add(obs={"agent_pos": rng.normal(size=(L, 2)).astype(np.float32),
                       "object": rng.normal(size=(L, width)).astype(np.float32),
                       "agentview_image": rng.integers(0, 256, (L, 16, 16, 3), dtype=np.uint8)},
                  actions=rng.uniform(-1, 1, (L, 2)).astype(np.float32), instruction=instruction, goal="red")


def test_multi_task_state_padding_and_init_from(tmp_path, capsys):
    """Tasks whose ``object`` widths differ (Lift 10, Can 14) train one checkpoint: the state token takes the widest,
    a narrower observation is zero-padded (the same actions as padding it by hand), a wider one is refused; a run
    starts from another checkpoint's weights, the state projection's columns fresh for the keys whose width
    differs."""
    import torch

    narrow, wide = tmp_path / "narrow.hdf5", tmp_path / "wide.hdf5"
    _object_demos(narrow, 3, "lift the block")
    _object_demos(wide, 5, "put the can in its bin")
    at = TINY.index("agent_pos")
    tiny = [*TINY[:at], "agent_pos", "object", *TINY[at + 1:]]
    multi = tmp_path / "multi"
    train_vla.main(["--datasets", str(narrow), str(wide), "--out", str(multi), "--steps", "2", *tiny])
    policy = load_policy(multi)
    assert policy.config.state_dims == [2, 5] and policy.config.padded_state_keys == ["object"]
    assert json.loads((multi / "train_record.json").read_text())["padded_state_keys"] == ["object"]
    rng = np.random.default_rng(0)
    obs = {"agentview_image": rng.integers(0, 256, (1, 2, 16, 16, 3), dtype=np.uint8),
           "agent_pos": rng.normal(size=(1, 2, 2)).astype(np.float32),
           "object": rng.normal(size=(1, 2, 3)).astype(np.float32), "instruction": np.array(["lift the block"])}
    padded = {**obs, "object": np.concatenate([obs["object"], np.zeros((1, 2, 2), np.float32)], -1)}
    a = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action"]
    b = policy.predict_action(padded, generator=torch.Generator().manual_seed(0))["action"]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"'object' must have shape \(B, 2, 5\) \(or narrower: zero-padded\)"):
        policy.predict_action({**obs, "object": np.zeros((1, 2, 6), np.float32)})

    # per-file sampling gives each task half the batches however long its demos; calibration windows alternate files
    from policies.vla import VLAConfig

    long = tmp_path / "long.hdf5"
    _object_demos(long, 5, "put the can in its bin", n=3, L=60)
    c = VLAConfig(cameras=["agentview"], state_keys=["agent_pos", "object"], state_dims=[2, 5], padded_state_keys=["object"],
                  action_dim=2, image_size=16, horizon=8, n_obs_steps=2, n_action_steps=4, text_encoder="hashed")
    data = train_vla.LanguageDemos([str(narrow), str(long)], c)
    g = torch.Generator().manual_seed(0)
    by_window = data.window_file[data.sample(4000, g)].mean()
    by_file = data.window_file[data.sample(4000, g, by="file")].mean()
    assert by_window > 0.8 and abs(by_file - 0.5) < 0.05
    with pytest.raises(ValueError, match="sample by 'window' or 'file'"):
        data.sample(2, g, by="task")
    # weighted shares: the short file three times as often as the long one, however few its windows
    by_weight = data.window_file[data.sample(4000, g, by="file", file_weights=[3, 1])].mean()
    assert abs(by_weight - 0.25) < 0.03
    assert (data.window_file[data.sample(200, g, by="file", file_weights=[0, 1])] == 1).all()
    for bad in ([1], [1, -1], [0, 0], [1, float("nan")]):
        with pytest.raises(ValueError, match="file weights must be 2 non-negative numbers"):
            data.sample(2, g, by="file", file_weights=bad)
    with pytest.raises(ValueError, match="need sampling by file"):
        data.sample(2, g, file_weights=[1, 1])
    for argv, message in ((["--file-weights", "2", "1"], "needs --sample-by file"),
                          (["--sample-by", "file", "--file-weights", "2"], "one non-negative share per dataset")):
        with pytest.raises(SystemExit):
            train_vla.parse_args(["--datasets", str(narrow), str(long), *argv])
        assert message in capsys.readouterr().err
    calib = data.calibration_obs(n=4)
    assert [t[0] for t in calib["instruction"]] == ["lift the block", "put the can in its bin"] * 2
    assert calib["object"].shape == (4, 2, 5) and not calib["object"][0, :, 3:].any()  # narrow: zero-padded

    # the manifest of a multi-task checkpoint: one evaluation per task
    for task, rate in (("lift", 0.9), ("can", 0.6)):
        (tmp_path / f"{task}.json").write_text(json.dumps({
            "task": task, "env": "robomimic", "cache": "none", "scheduler": "flow", "num_inference_steps": 4,
            "n_episodes": 50, "seeds": [0, 49], "success_rate": rate, "success_ci95": [rate - 0.1, rate + 0.1],
            "latency_ms": {"p50": 1.0}, "inference_hz": 1.0, "control_hz": 1.0, "device": "cpu", "language": None}))
    manifest.main(["--checkpoint", str(multi), "--summary", str(tmp_path / "lift.json"), str(tmp_path / "can.json"),
                   "--collect", "collect lift", "collect can", "--eval-command", "run lift", "run can"])
    m = json.loads((multi / "manifest.json").read_text())
    assert m["tasks"] == ["lift", "can"] and m["demos"]["command"] == ["collect lift", "collect can"]
    assert m["evaluations"]["can"]["success_rate"] == 0.6 and m["evaluations"]["lift"]["command"] == "run lift"
    # two seed sets of one cell are pooled; other cells or overlapping seeds are refused, naming why
    lift = json.loads((tmp_path / "lift.json").read_text())
    (tmp_path / "lift_s2.json").write_text(json.dumps({**lift, "seeds": [50, 99], "success_rate": 0.8}))
    manifest.main(["--checkpoint", str(multi), "--summary", str(tmp_path / "lift.json"), str(tmp_path / "lift_s2.json"),
                   str(tmp_path / "can.json"), "--collect", "c"])
    e = json.loads((multi / "manifest.json").read_text())["evaluations"]["lift"]
    assert (e["n_episodes"], e["n_successes"], e["success_rate"]) == (100, 85, 0.85) and len(e["runs"]) == 2
    assert e["success_ci95"][0] < 0.85 < e["success_ci95"][1] and e["runs"][1]["seeds"] == [50, 99]
    with pytest.raises(ValueError, match="pool only on disjoint seeds"):
        manifest.main(["--checkpoint", str(multi), "--summary", str(tmp_path / "can.json"), str(tmp_path / "can.json"),
                       "--collect", "c"])
    (tmp_path / "lift_bac.json").write_text(json.dumps({**lift, "seeds": [50, 99], "cache": "bac"}))
    with pytest.raises(ValueError, match=r"differ in \['cache'\]"):
        manifest.main(["--checkpoint", str(multi), "--summary", str(tmp_path / "lift.json"),
                       str(tmp_path / "lift_bac.json"), "--collect", "c"])
    with pytest.raises(ValueError, match="1 --eval-command for 2 --summary"):
        manifest.main(["--checkpoint", str(multi), "--summary", str(tmp_path / "lift.json"), str(tmp_path / "can.json"),
                       "--collect", "c", "--eval-command", "run"])

    single = tmp_path / "single"  # narrow only: object 3-d
    train_vla.main(["--datasets", str(narrow), "--out", str(single), "--steps", "2", *tiny])
    assert load_policy(single).config.padded_state_keys == []
    again = tmp_path / "again"
    train_vla.main(["--datasets", str(narrow), str(wide), "--out", str(again), "--steps", "1", "--lr", "0",
                    "--init-from", str(single), *tiny])
    init = json.loads((again / "train_record.json").read_text())["init_from"]
    # the state projection keeps the columns of agent_pos (same width) and object's 3 as the leading columns of
    # the padded (wider) object; its new columns start fresh
    assert init["checkpoint"] == str(single) and init["steps"] == 2 and init["fresh_tensors"] == []
    assert init["state_proj_columns_kept"] == ["agent_pos", "object[:3]"]
    src, dst = load_policy(single).state_dict(), load_policy(again).state_dict()
    assert all(torch.equal(src[k], dst[k]) for k in src if k != "state_proj.weight")  # lr 0: the init kept
    assert src["state_proj.weight"].shape[1] == 5 and dst["state_proj.weight"].shape[1] > 5
    assert torch.equal(src["state_proj.weight"], dst["state_proj.weight"][:, :5])
    with pytest.raises(ValueError, match="n_emb 32 there, 48 here"):
        train_vla.main(["--datasets", str(narrow), "--out", str(tmp_path / "bad"), "--steps", "1",
                        "--init-from", str(single), *tiny[:tiny.index("--n-emb")], "--n-emb", "48",
                        *tiny[tiny.index("--n-emb") + 2:]])


def test_latency_split_comes_from_the_timed_calls():
    """``measure_latency(split=...)`` takes the prefix / expert medians of the timed calls only: the warm-up
    calls' parts are dropped with their times."""
    from eval.latency import measure_latency

    class Recorder:
        device = "cpu"
        calls = 0

        def predict_action(self, obs, generator=None, timings=None):
            assert obs["agent_pos"].shape == (1, 2)  # batch 1
            if timings is not None:  # call i reports i ms of prefix and 2 i ms of expert
                timings.update(prefix_s=1e-3 * self.calls, expert_s=2e-3 * self.calls)
            self.calls += 1

    policy, split = Recorder(), {}
    times = measure_latency(policy, {"agent_pos": np.zeros((4, 2), np.float32)}, 3, 0, split=split)
    assert len(times) == 3 and policy.calls == 5
    assert split == {"prefix": 3.0, "expert": 6.0}  # calls 2, 3, 4 kept (with calls 0-4: 2.0 and 4.0)
    assert measure_latency(policy, {"agent_pos": np.zeros((1, 2), np.float32)}, 2, 0) and policy.calls == 9


def _task_demos(path, task: str, instruction: str, n: int = 2, L: int = 12):
    """Demos of a robomimic task (its env_args name it) with random numbers in its ``object`` layout."""
    from envs.objects import OBJECTS
    from envs.robomimic import TASKS

    _object_demos(path, sum(w for _, w in OBJECTS[task]), instruction, n, L,
                  env_meta={"env_name": TASKS[task], "wrapper": {"task": task}})


def test_object_tokens_share_the_objects_across_tasks_and_start_from_a_padded_checkpoint(tmp_path):
    """``--object-tokens`` over Can and PickPlace files: one token per object by name, the can of Can in the can's
    token (PickPlace's fourth block), absent objects marked per row; normalizer limits per object over the demos
    that hold it; the checkpoint predicts on a Can scene (only ``object_can``) and refuses one with no object key;
    a run from a padded-``object`` checkpoint keeps the robot state's columns of its state projection."""
    import torch

    from envs.objects import split_objects

    can, pp = tmp_path / "can.hdf5", tmp_path / "pp.hdf5"
    _task_demos(can, "can", "put the can in its bin")
    _task_demos(pp, "pick_place", "put the milk in its bin")
    out = tmp_path / "objects"
    train_vla.main(["--datasets", str(can), str(pp), "--out", str(out), "--steps", "2", "--object-tokens", *TINY])
    policy = load_policy(out)
    c = policy.config
    assert c.state_keys == ["agent_pos"]
    assert c.object_keys == ["object_can", "object_milk", "object_bread", "object_cereal"] and c.object_dims == [14] * 4
    assert json.loads((out / "train_record.json").read_text())["object_keys"] == c.object_keys

    data = train_vla.LanguageDemos([str(can), str(pp)], c)
    with h5py.File(can, "r") as f:
        can_obj = f["data/demo_0/obs/object"][()]
    with h5py.File(pp, "r") as f:
        pp_obj = f["data/demo_0/obs/object"][()]
    d_can, d_pp = data.demos[0], data.demos[2]
    assert d_can["present"].tolist() == [True, False, False, False] and d_pp["present"].all()
    assert np.array_equal(d_can["objects"][:, :14], can_obj) and not d_can["objects"][:, 14:].any()
    assert np.array_equal(d_pp["objects"][:, :14], split_objects("pick_place", pp_obj)["object_can"])
    assert np.array_equal(d_pp["objects"][:, 14:28], pp_obj[:, :14])  # the milk
    norm = data.normalizer()
    assert len(norm.stats["object_milk"]["min"]) == 14  # fitted on PickPlace's demos only (Can has no milk)
    calib = np.load(out / "calibration" / "calib_obs.npz")
    assert calib["object_present"].shape == (4, 4) and calib["object_can"].shape == (4, 2, 14)

    rng = np.random.default_rng(0)
    obs = {"agentview_image": rng.integers(0, 256, (1, 2, 16, 16, 3), dtype=np.uint8),
           "agent_pos": rng.normal(size=(1, 2, 2)).astype(np.float32),
           "object_can": rng.normal(size=(1, 2, 14)).astype(np.float32), "instruction": np.array(["put the can"])}
    assert policy.predict_action(obs)["action"].shape == (1, c.n_action_steps, 2)
    with pytest.raises(KeyError, match="none of the policy's object keys"):
        policy.predict_action({k: v for k, v in obs.items() if k != "object_can"})
    windows = vla_reuse.replay_windows(can, policy, 1)[0]  # the offline token-reuse replay reads the objects too
    assert windows[0]["object_can"].shape == (1, 2, 14) and "object_milk" not in windows[0]
    assert policy.predict_action(windows[0])["action"].shape == (1, c.n_action_steps, 2)
    with pytest.raises(ValueError, match="leave 'object' out of --state-keys"):
        at = TINY.index("agent_pos")
        train_vla.main(["--datasets", str(can), "--out", str(tmp_path / "bad"), "--steps", "1", "--object-tokens",
                        *TINY[:at], "agent_pos", "object", *TINY[at + 1:]])

    padded = tmp_path / "padded"  # the same files with object in the state token, zero-padded
    at = TINY.index("agent_pos")
    train_vla.main(["--datasets", str(can), str(pp), "--out", str(padded), "--steps", "2",
                    *TINY[:at], "agent_pos", "object", *TINY[at + 1:]])
    moved = tmp_path / "moved"
    train_vla.main(["--datasets", str(can), str(pp), "--out", str(moved), "--steps", "1", "--lr", "0", "--object-tokens",
                    "--image-attention", "images", "--init-from", str(padded), *TINY])
    assert load_policy(moved).config.image_attention == "images"  # a mask, not a weight: free across --init-from
    init = json.loads((moved / "train_record.json").read_text())["init_from"]
    assert init["state_proj_columns_kept"] == ["agent_pos"]
    assert init["fresh_tensors"] == sorted(["object_pos"] + [f"object_proj.{k}.{w}" for k in c.object_keys for w in ("bias", "weight")])
    src, dst = load_policy(padded).state_dict(), load_policy(moved).state_dict()
    assert torch.equal(src["state_proj.weight"][:, :2], dst["state_proj.weight"])
    assert all(torch.equal(src[k], dst[k]) for k in src if k != "state_proj.weight")


def test_frontier_on_a_vla_from_observations_recorded_in_closed_loop(tmp_path):
    """eval/record_obs.py keeps held-out observations from the VLA's own rollouts (no demos needed), and
    eval/frontier.py measures fewer flow steps against caches on the expert over them (configs/frontier/vla.yaml)."""
    import eval.frontier as frontier
    import eval.record_obs as record_obs
    from omegaconf import OmegaConf

    demos = tmp_path / "toy_lang.hdf5"
    assert collect.main(["--task", "toy", "--language", "--cameras", "agentview", "--image-size", "16",
                         "--n-demos", "2", "--out", str(demos)]) == 0
    ckpt = tmp_path / "vla"
    train_vla.main(["--datasets", str(demos), "--out", str(ckpt), "--steps", "2", *TINY])
    base = ["env=toy_lang", "policy=vla", f"policy.checkpoint={ckpt}"]
    from eval.calibrate import calibrate

    # calibrate.py saves the calibration a VLA's calibrated caches otherwise make in memory: the same schedules
    from policies import load_policy
    from policies.cache_target import calibration_path, make_cache

    policy = load_policy(ckpt)
    bac_cfg = {"name": "bac", "n_updates": 2, "n_bubble": 1}
    in_memory = make_cache(policy, ckpt, bac_cfg)
    saved_path = calibrate(compose_cfg(*base, "calibrate.n_updates=[2]"))
    assert saved_path == calibration_path(ckpt, "FlowMatchEulerDiscreteScheduler", policy.config.num_inference_steps)
    saved = make_cache(policy, ckpt, bac_cfg)
    assert saved.steps == in_memory.steps and saved.calibration["calib_obs"] == "calibration/calib_obs.npz"
    assert saved.calibration["n_obs"] == 2  # the toy checkpoint's calib_obs.npz holds 2 (its 2 demos)
    assert (ckpt / "schedules" / f"bac_S2_n1_cosine_FlowMatchEulerDiscrete_K{policy.config.num_inference_steps}.json").exists()
    other = load_policy(ckpt)
    with torch.no_grad():
        next(other.expert.parameters()).add_(1.0)  # other weights: the saved calibration is not theirs
    with pytest.raises(ValueError, match="calibrated on other weights"):
        make_cache(other, ckpt, bac_cfg)
    with pytest.raises(ValueError, match="leave calibrate.dataset unset"):
        calibrate(compose_cfg(*base, f"calibrate.dataset={demos}"))
    with pytest.raises(FileNotFoundError, match="record_obs.py"):
        frontier.frontier(compose_cfg(*base, "frontier=vla", f"frontier.out={tmp_path / 'f'}", "frontier.phase=latency"))
    out = record_obs.record(compose_cfg(*base, "record.n_obs=5", "record.n_episodes=2"))
    assert out == ckpt / "calibration" / "bench_obs_toy.npz"  # one file per task
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["kept"] == 5 and meta["replanning_points"] >= 5 and meta["seeds"] == [100000, 100001]
    with np.load(out, allow_pickle=False) as z:
        assert z["instruction"].shape == (5, 2) and z["agentview_image"].shape == (5, 2, 16, 16, 3)
    # eval/bench.py times and scores caches on them (the instruction stays text)
    import eval.bench as bench

    rows = bench.bench(compose_cfg(*base, "bench.caches=[none,bac]", "bench.n_updates=[2]", "bench.n_bubble=[1]",
                                   "bench.trials=1", "bench.warmup=0", "bench.n_obs=3"), tmp_path / "bench")
    by_label = {r["config"]: r for r in rows}
    assert by_label["none"]["action_mse"] == 0.0 and by_label["bac@S2"]["flops_ratio"] < 1.0
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        record_obs.record(compose_cfg(*base, "record.n_obs=3"))
    assert out.read_bytes() == before  # what earlier benchmarks measured on is kept

    cfg = compose_cfg(*base, "frontier=vla", f"frontier.out={tmp_path / 'f'}", "frontier.n_episodes=2",
                      "frontier.n_envs=2", "frontier.trials=1", "frontier.warmup=0", "frontier.n_obs=3",
                      "frontier.proxy_refs=[flow-4,flow-8]", "frontier.reference=flow-4", "frontier.first=[flow-4]",
                      "frontier.cached_on=[flow-4]")
    OmegaConf.set_struct(cfg, False)
    cfg.frontier.samplers = {"flow": [2, 4]}
    cfg.frontier.caches = [{"name": "fora", "interval": 2}, {"name": "bac", "keep": 0.5, "n_bubble": 1}]
    result = frontier.frontier(cfg)
    report = json.loads((tmp_path / "f" / "frontier.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"flow-2", "flow-4", "flow-4+fora[interval=2]", "flow-4+bac[n_bubble=1,n_updates=2]"}
    assert all(r["success"]["episodes"] == 2 for r in rows.values()) and result["reference"] == "flow-4"
    assert rows["flow-4"]["mse_vs_flow4"] == 0.0 and rows["flow-2"]["mse_vs_flow8"] > 0
    assert rows["flow-4+fora[interval=2]"]["flops_ratio"] < 1.0 and rows["flow-4"]["flops_ratio"] == 1.0
    summary = json.loads((tmp_path / "f" / "cells" / "flow-2" / "s0" / "summary.json").read_text())
    assert summary["scheduler"] == "flow" and summary["num_inference_steps"] == 2
    md = (tmp_path / "f" / "frontier.md").read_text()
    assert "MSE vs flow-4 | MSE vs flow-8" in md and "env=toy_lang env.task=" in md and "frontier=vla" in md
    assert report["meta"]["model_hash"] == summary["model_hash"]
    # loop.budget_ms chooses over this VLA's frontier (frontier=vla says where it is), not over DP-T's
    s = run.evaluate(compose_cfg(*base, "frontier=vla", f"frontier.out={tmp_path / 'f'}", "loop.budget_ms=1000",
                                 "tune.trials=1", "tune.n_obs=2", f"tune.records={tmp_path / 'rec'}",
                                 "eval.n_episodes=1", "eval.latency_trials=2"), tmp_path / "budget")
    assert s["budget"]["chosen"]["label"] in rows and s["scheduler"] == "flow"
    with pytest.raises(ValueError, match="was measured on checkpoints/lift"):
        run.evaluate(compose_cfg(*base, "tune.frontier=docs/frontier/lift/frontier.json", "loop.budget_ms=1000",
                                 f"tune.records={tmp_path / 'rec'}", "eval.n_episodes=1"), tmp_path / "wrong")


def test_held_out_observations_are_the_asked_tasks_or_refused(tmp_path):
    """A multi-task checkpoint keeps one bench_obs_<task>.npz per task; the task-less file stands in only when its
    sidecar names no other task, so a Lift frontier is never timed on Can's observations."""
    from types import SimpleNamespace

    from eval.common import bench_obs_file, load_bench_obs

    policy = SimpleNamespace(config=SimpleNamespace(obs_keys=["agent_pos", "instruction"]))
    cal = tmp_path / "calibration"
    cal.mkdir()
    with pytest.raises(FileNotFoundError, match="bench_obs_lift.npz is missing.*env.task=lift"):
        load_bench_obs(policy, tmp_path, 4, "lift")

    def save(name, value, task=None):
        np.savez(cal / f"{name}.npz", agent_pos=np.full((3, 2, 2), value, np.float32),
                 instruction=np.array([["lift the cube"] * 2] * 3))
        if task:
            (cal / f"{name}.json").write_text(json.dumps({"task": task}))

    save("bench_obs", 1.0, task="can")  # recorded before the files were per task
    assert bench_obs_file(policy, tmp_path, "can").name == "bench_obs.npz"
    with pytest.raises(ValueError, match="task 'can', not 'lift'"):
        load_bench_obs(policy, tmp_path, 4, "lift")
    save("bench_obs_lift", 2.0)
    obs = load_bench_obs(policy, tmp_path, 2, "lift")
    assert obs["agent_pos"].shape == (2, 2, 2) and float(obs["agent_pos"].max()) == 2.0
    assert obs["instruction"][0, 0] == "lift the cube"
    (cal / "bench_obs.json").unlink()  # a task-less file without a sidecar (DP-T's, from calibrate.py) serves any task
    assert float(load_bench_obs(policy, tmp_path, 2, "square")["agent_pos"].max()) == 1.0
    np.savez(cal / "bench_obs_can.npz", instruction=np.array([["x"] * 2] * 3))
    with pytest.raises(ValueError, match=r"lacks observation keys \['agent_pos'\]"):
        load_bench_obs(policy, tmp_path, 2, "can")
