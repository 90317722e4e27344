"""End to end on the toy task: collect demos, train a tiny DP-T, evaluate through hydra's compose API."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import eval.run as run
import eval.train as train
from bac.engine import fingerprint
from policies import load_policy
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


def test_trained_toy_policy_succeeds_and_summary_is_valid(toy_checkpoint, tmp_path):
    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=40", "eval.n_envs=40",
                      "eval.latency_trials=3", "eval.video=true", "eval.n_video=1")
    summary = run.evaluate(cfg, tmp_path)
    # A policy that averages the two modes scores 0 (it runs into the wall); the expert scores 1.
    assert summary["success_rate"] >= 0.6, summary
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ["task", "cache", "n_episodes", "success_rate", "success_ci95", "latency_ms", "inference_hz",
                "control_hz", "device"]:
        assert key in on_disk, key
    assert on_disk["n_episodes"] == 40 and on_disk["cache"] == "none" and on_disk["task"] == "toy"
    lo, hi = on_disk["success_ci95"]
    assert lo <= on_disk["success_rate"] <= hi
    assert on_disk["latency_ms"]["p50"] <= on_disk["latency_ms"]["p95"]
    assert set(on_disk["latency_conditions"]) == {"other_busy_cores", "cpus", "load_avg_1m"}
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["seed"] for line in lines) == list(range(40))
    assert (tmp_path / "config.yaml").exists()
    videos = list((tmp_path / "videos").glob("*.mp4"))
    assert len(videos) == 1
    import eval.figures as figures

    figures.main(["frames", str(videos[0]), "--n-frames", "4", "--out", str(tmp_path / "strip.png")])
    assert (tmp_path / "strip.png").stat().st_size > 5_000
    with pytest.raises(FileNotFoundError, match="eval.video=true"):
        figures.main(["frames", str(tmp_path / "missing.mp4"), "--out", str(tmp_path / "x.png")])


def test_machine_load_sees_another_busy_process():
    """A summary says what else ran while its latency was timed: a busy loop in a child process is counted."""
    import os
    import subprocess
    import sys
    import time

    from eval.latency import MachineLoad

    if not Path("/proc/stat").exists():
        pytest.skip("MachineLoad reads /proc/stat (Linux)")
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    try:
        time.sleep(0.3)  # the child is running
        with MachineLoad() as load:
            time.sleep(1.0)  # this process idle: what is busy is someone else
    finally:
        child.wait()
    assert load.other_busy_cores >= 0.5 and load.busy()
    record = load.record()
    assert record["cpus"] == os.cpu_count() and record["other_busy_cores"] == round(load.other_busy_cores, 2)


def test_n_action_steps_override(toy_checkpoint, tmp_path):
    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=2", "eval.n_envs=2",
                      "eval.latency_trials=1", "policy.n_action_steps=2")
    summary = run.evaluate(cfg, tmp_path)
    assert summary["n_action_steps"] == 2
    episode = json.loads((tmp_path / "episodes.jsonl").read_text().splitlines()[0])
    assert episode["n_chunks"] >= episode["steps"] / 2  # one plan per two executed actions
    with pytest.raises(ValueError, match="n_action_steps"):
        run.evaluate(compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "policy.n_action_steps=40"), tmp_path / "x")


def test_crash_keeps_finished_episodes(toy_checkpoint, tmp_path, monkeypatch):
    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=6", "eval.n_envs=3")
    real_simulate = run.simulate
    calls = []

    def simulate_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash in the second batch")
        return real_simulate(*args, **kwargs)

    monkeypatch.setattr(run, "simulate", simulate_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run.evaluate(cfg, tmp_path)
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["seed"] for line in lines) == [0, 1, 2]
    # A rerun into the folder is refused unless it resumes; resuming runs only the missing seeds and the
    # summary counts every episode once.
    monkeypatch.setattr(run, "simulate", real_simulate)
    with pytest.raises(FileExistsError, match="eval.resume=true"):
        run.evaluate(cfg, tmp_path)
    with open(tmp_path / "episodes.jsonl", "a") as f:
        f.write('{"seed": 4, "succ')  # a line cut by the crash
    summary = run.evaluate(compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=6",
                                       "eval.n_envs=3", "eval.resume=true"), tmp_path)
    lines = (tmp_path / "episodes.jsonl").read_text().splitlines()
    assert lines[3] == '{"seed": 4, "succ'  # the cut line stays as it was; new episodes start on a line of their own
    episodes = [json.loads(line) for line in lines[:3] + lines[4:]]
    assert sorted(e["seed"] for e in episodes) == list(range(6))
    assert summary["n_episodes"] == 6 and summary["n_successes"] == sum(e["success"] for e in episodes)


def test_unknown_cache_and_task_are_named(toy_checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"unknown cache 'magic'; known caches: \['none', 'uniform'"):
        run.evaluate(compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "cache.name=magic"), tmp_path)
    with pytest.raises(ValueError, match="one task, 'toy'"):
        run.evaluate(compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "env.task=lift"), tmp_path)


def test_env_policy_mismatch_is_named(toy_checkpoint, tmp_path):
    class WrongEnv:
        from gymnasium import spaces

        observation_space = spaces.Dict({"agent_pos": spaces.Box(-1, 1, (3,))})
        action_space = spaces.Box(-1, 1, (2,))

    policy = run.load_policy(toy_checkpoint)
    with pytest.raises(KeyError, match=r"does not provide observation keys \['goal_pos'\]"):
        run.check_env_matches_policy(WrongEnv(), policy)


def test_train_refuses_to_clobber_and_resumes(toy_checkpoint, tmp_path):
    data = toy_checkpoint.parent / "toy.hdf5"
    base = ["--dataset", str(data), "--out", str(tmp_path / "c"), "--n-layer", "1", "--n-emb", "16", "--quiet",
            "--save-every", "5"]
    train.train(train.parse_args(base + ["--steps", "10"]))
    with pytest.raises(FileExistsError, match="--resume"):
        train.train(train.parse_args(base + ["--steps", "20"]))
    train.train(train.parse_args(base + ["--steps", "20", "--resume"]))
    record = json.loads((tmp_path / "c" / "train_record.json").read_text())
    assert record["steps"] == 20 and len(record["dataset_sha256"]) == 64
    assert np.isfinite(record["final_loss"])


def test_train_time_budget_sets_the_schedule_and_stops(toy_checkpoint, tmp_path):
    data = toy_checkpoint.parent / "toy.hdf5"
    base = ["--dataset", str(data), "--n-layer", "1", "--n-emb", "16", "--quiet", "--warmup", "50"]
    # A budget far below the step cap: the probe lowers the total and the run ends exactly there.
    train.train(train.parse_args(base + ["--out", str(tmp_path / "a"), "--steps", "10000000", "--time-budget-s", "2"]))
    record = json.loads((tmp_path / "a" / "train_record.json").read_text())
    assert 50 <= record["steps"] == record["total_steps"] < 10000000 and record["time_budget_s"] == 2
    # A budget that the cap reaches first changes nothing.
    train.train(train.parse_args(base + ["--out", str(tmp_path / "b"), "--steps", "60", "--time-budget-s", "600"]))
    assert json.loads((tmp_path / "b" / "train_record.json").read_text())["steps"] == 60
    assert train.steps_for_budget(10, 0, 100, 1.0, 200, 10**9) == 200 + 950
    assert train.steps_for_budget(10, 12, 100, 1.0, 200, 10**9) == 200  # already over: stop where it is
    with pytest.raises(ValueError, match="time-budget-s must be positive"):
        train.train(train.parse_args(base + ["--out", str(tmp_path / "c"), "--time-budget-s", "0"]))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA device"):
            train.train(train.parse_args(base + ["--out", str(tmp_path / "d"), "--device", "cuda"]))
        assert not (tmp_path / "d").exists()


def test_train_init_from_starts_at_the_source_weights(toy_checkpoint, tmp_path):
    data = toy_checkpoint.parent / "toy.hdf5"
    arch = ["--n-layer", "2", "--n-emb", "64"]
    base = ["--dataset", str(data), "--quiet", "--init-from", str(toy_checkpoint)]
    # Zero steps: the saved weights are the source's, and the record names where they came from.
    train.train(train.parse_args(base + arch + ["--out", str(tmp_path / "a"), "--steps", "1", "--lr", "0"]))
    src = load_file(str(toy_checkpoint / "model.safetensors"))
    got = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert src.keys() == got.keys() and all(torch.equal(src[k], got[k]) for k in src)
    record = json.loads((tmp_path / "a" / "train_record.json").read_text())
    assert record["init_from"]["checkpoint"] == str(toy_checkpoint) and record["init_from"]["steps"] == 2000
    with pytest.raises(ValueError, match="n_emb 64 there, 32 here"):
        train.train(train.parse_args(base + ["--n-layer", "2", "--n-emb", "32", "--out", str(tmp_path / "b"), "--steps", "1"]))


def test_floor_ceiling():
    from eval.bench import floor_ceiling

    assert floor_ceiling(1.0, 0.0, 100, 0.1) == pytest.approx(10.0)  # a free floor: the FLOPs ceiling
    assert floor_ceiling(1.0, 0.005, 100, 0.1) == pytest.approx(1 / (0.5 + 0.05))  # half of each step is floor
    assert floor_ceiling(1.0, 0.02, 100, 0.1) == 1.0  # a floor above the uncached step cannot be beaten


def test_calibrate_bench_and_cached_rollouts(toy_checkpoint, tmp_path):
    import eval.bench as bench
    import eval.calibrate as calibrate

    data = toy_checkpoint.parent / "toy.hdf5"
    base = ["env=toy", f"policy.checkpoint={toy_checkpoint}", f"calibrate.dataset={data}", "calibrate.n_obs=4",
            "calibrate.n_updates=[5,10]"]
    out = calibrate.calibrate(compose_cfg(*base))
    assert out.exists() and all((toy_checkpoint / "schedules" / f"bac_S10_n{n}_cosine_K100.json").exists() for n in (1, 5))
    rows = bench.bench(compose_cfg(*base, "bench.trials=2", "bench.warmup=1", "bench.n_obs=2"), tmp_path / "bench")
    by = {r["config"]: r for r in rows}
    assert set(by) == {"none", "uniform@S10", "unified_acs@S10", "blockwise_acs@S10", "bac@S10n1", "bac@S10n5"}
    assert by["none"]["action_mse"] == 0.0 and by["none"]["speedup"] == 1.0
    assert all(0 < r["flops_ratio"] < 1 and r["action_mse"] > 0 for c, r in by.items() if c != "none")
    assert by["bac@S10n5"]["flops_ratio"] >= by["bac@S10n1"]["flops_ratio"] >= by["blockwise_acs@S10"]["flops_ratio"]
    assert by["bac@S10n5"]["flops_ratio"] > by["blockwise_acs@S10"]["flops_ratio"]  # the union adds updates
    saved = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {"cache", "latency_ms", "speedup", "flops_ratio", "action_mse", "device"} <= set(saved["rows"][0])
    assert 0 < saved["meta"]["floor_ms_per_step"] < saved["meta"]["uncached_ms_per_step"]
    assert all(1 <= r["floor_ceiling"] <= 1 / r["flops_ratio"] for c, r in by.items() if c != "none")
    summary = run.evaluate(compose_cfg(*base, "cache=bac", "eval.n_episodes=10", "eval.n_envs=10",
                                       "eval.latency_trials=2"), tmp_path / "run")
    assert summary["cache"] == "bac" and 0 < summary["flops_ratio"] < 1
    assert summary["model_hash"] == fingerprint(load_policy(toy_checkpoint).model)
    assert summary["cache_stats"]["reused"] and sum(summary["cache_stats"]["reused"]) > 0
    import eval.figures as figures

    figures.main(["heatmaps", "--checkpoint", str(toy_checkpoint), "--out", str(tmp_path / "h.png")])
    figures.main(["step-error", "--checkpoint", str(toy_checkpoint), "--out", str(tmp_path / "e.png")])
    figures.main(["hz-success", str(tmp_path / "run"), "--out", str(tmp_path / "z.png")])
    assert all((tmp_path / f).stat().st_size > 10_000 for f in ["h.png", "e.png", "z.png"])
    import eval.report as report

    md = report.table(report.load([tmp_path / "run"]))
    assert "| toy | bac | 10 | 1 | 10 |" in md  # cache=bac: n = 1 by default


def test_realtime_loop_reports_misses_and_budget_picks_s(toy_checkpoint, tmp_path):
    base = ["env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=4", "eval.n_envs=4", "loop=realtime",
            "eval.latency_trials=3", "loop.latency_samples=3"]
    # Sync inference with 0.35 s of latency at 10 Hz: every chunk after the first arrives 4 ticks late.
    s = run.evaluate(compose_cfg(*base, "loop.latency=fixed", "loop.latency_ms=350", "loop.asynchronous=false"),
                     tmp_path / "sync")
    assert s["loop"] == "realtime" and s["deadline_misses"] > 0 and s["stale_dropped"] > 0
    assert s["loop_config"]["sim_latency_ms"] == 350.0 and set(s["latency_ms"]) == {"p50", "p95", "p99"}
    assert s["control_hz"] < 10.0 and s["action_age_ms"] > 0
    episode = json.loads((tmp_path / "sync" / "episodes.jsonl").read_text().splitlines()[0])
    assert episode["loop"]["latencies_ms"][1] == 350.0
    # Asynchronous with the same latency hides it: no misses.
    a = run.evaluate(compose_cfg(*base, "loop.latency=fixed", "loop.latency_ms=350"), tmp_path / "async")
    assert a["deadline_misses"] == 0
    # A budget nothing meets picks the fastest S and says so; a generous one keeps the uncached policy.
    tight = run.evaluate(compose_cfg(*base, "cache=uniform", "loop.budget_ms=0.001", "tune.n_updates=[2,5]",
                                     "tune.trials=2"), tmp_path / "tight")
    assert tight["budget"]["chosen"]["meets_budget"] is False and tight["cache"] == "uniform"
    loose = run.evaluate(compose_cfg(*base, "cache=uniform", "loop.budget_ms=100000", "tune.n_updates=[2,5]",
                                     "tune.trials=2"), tmp_path / "loose")
    assert loose["budget"]["chosen"]["meets_budget"] is True and loose["cache"] == "none"


@pytest.mark.parametrize("cache", [[], ["cache=fbcache", "cache.threshold=0.5"]], ids=["none", "fbcache"])
def test_deploy_on_the_simulated_robot_logs_every_tick(toy_checkpoint, tmp_path, cache):
    import eval.deploy as deploy

    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "deploy.max_steps=30", *cache,
                      config_name="deploy")
    assert cfg.loop.name == "realtime"
    s = deploy.deploy(cfg, tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "deploy.jsonl").read_text().splitlines()]
    assert len([x for x in lines if "tick" in x]) == s["ticks"] and "summary" in lines[-1]
    assert s["stopped"] is None and s["ticks"] <= 30 and s["latency_ms"]["p95"] > 0
    assert json.loads((tmp_path / "summary.json").read_text())["task"] == "toy"


@pytest.mark.parametrize("fault, reason", [("nan", "NaN"), ("wrong_size", "shape (1,); the robot takes (2,)"),
                                           ("hang", "inference exceeded its 2000 ms deadline"),
                                           ("send_error", "ConnectionError")])
def test_deploy_with_an_injected_fault_stops_the_robot_with_its_safe_action(toy_checkpoint, tmp_path, fault, reason):
    import eval.deploy as deploy

    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "deploy.max_steps=60", f"deploy.fault={fault}",
                      "deploy.fault_at=2", "deploy.inference_deadline_ms=2000", "deploy.max_consecutive_misses=1000",
                      config_name="deploy")
    sent = []
    from envs.sim_robot import SimRobot

    real_send = SimRobot.send_action

    def record(self, action):
        sent.append(np.asarray(action).copy())
        real_send(self, action)

    SimRobot.send_action = record
    try:
        s = deploy.deploy(cfg, tmp_path)
    finally:
        SimRobot.send_action = real_send
    assert reason in s["stopped"] and s["stop_errors"] == []
    assert all(a.shape == (2,) and np.all(np.isfinite(a)) for a in sent)  # only checked actions reached it
    assert s["safety"]["safe_actions_sent"] >= 1 and np.array_equal(sent[-1], [0.0, 0.0])
    assert json.loads((tmp_path / "summary.json").read_text())["safety"]["checked"] >= len(sent) - 1


def test_wall_clock_episodes_through_run(toy_checkpoint, tmp_path):
    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=2", "loop=realtime",
                      "loop.clock=wall", "eval.latency_trials=2", "loop.latency_samples=2")
    s = run.evaluate(cfg, tmp_path)
    assert s["clock"] == "wall" and s["n_episodes"] == 2 and 0 < s["control_hz"] <= 10.5
    lines = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and all(x["loop"]["n_inferences"] >= 1 for x in lines)


def test_cache_knobs_and_task_are_checked_before_anything_runs(toy_checkpoint, tmp_path):
    from bac.engine import find_blocks
    from bac.schedule import uniform
    from policies.cache_target import make_cache, policy_signature

    policy = load_policy(toy_checkpoint)
    for bad in (0, 1000, None):  # 0 once ran S = 10; 1000 ran uncached under the cache's label
        with pytest.raises(ValueError, match=r"cache.n_updates=.* must be an integer in \[1, K=100\]"):
            make_cache(policy, toy_checkpoint, {"name": "uniform", "n_updates": bad})
    scheduler, K, model_hash = policy_signature(policy)
    blocks = [info.name for _, _, info in find_blocks(policy.model)]
    uniform(blocks, K, 5, scheduler=scheduler, model_hash=model_hash).save(tmp_path / "u.json")
    with pytest.raises(ValueError, match="holds a 'uniform' schedule, but cache=bac"):
        make_cache(policy, toy_checkpoint, {"name": "bac", "n_updates": 5, "schedule": str(tmp_path / "u.json")})
    with pytest.raises(ValueError, match="unknown robomimic task 'stack'"):  # not "checkpoint missing"
        run.evaluate(compose_cfg("env=robomimic", "env.task=stack"), tmp_path / "stack")
    with pytest.raises(ValueError, match="eval.n_episodes and eval.n_envs must be >= 1"):
        run.evaluate(compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=0"), tmp_path / "z")


def test_a_results_folder_is_held_by_one_run(toy_checkpoint, tmp_path):
    import os

    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", "eval.n_episodes=2", "eval.n_envs=2",
                      "eval.latency_trials=1")
    (tmp_path / ".run.lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(FileExistsError, match=f"being written by another run \\(pid {os.getppid()}\\)"):
        run.evaluate(cfg, tmp_path)
    (tmp_path / ".run.lock").write_text("999999999")  # its writer is gone: taken over
    assert run.evaluate(cfg, tmp_path)["n_episodes"] == 2
    assert not (tmp_path / ".run.lock").exists()  # released



def test_a_full_disk_leaves_the_previous_summary(tmp_path, monkeypatch):
    """summary.json is written to a temporary file and renamed: a failed write keeps the old file, whole."""
    import errno
    from pathlib import Path

    from eval.common import write_atomic

    target = tmp_path / "summary.json"
    write_atomic(target, '{"n_episodes": 50}\n')
    real_write = Path.write_text

    def full_disk(self, text, *a, **k):
        real_write(self, text[: len(text) // 2], *a, **k)  # half of it lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, '{"n_episodes": 100, "success_rate": 0.5}\n')
    monkeypatch.undo()
    assert target.read_text() == '{"n_episodes": 50}\n' and [p.name for p in tmp_path.iterdir()] == ["summary.json"]

