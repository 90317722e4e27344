"""The frontier: Pareto set and budget choice on hand-made tables, the grid, and the runner's resume."""
from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

import eval.frontier as frontier
import eval.run as run
from bac.frontier import choose_for_budget, pareto, pooled
from tests.conftest import compose_cfg


def test_pareto_on_a_hand_made_table():
    #        a    b    c    d    e    f
    costs = [10, 20, 15, 30, 20, 5]
    values = [.6, .8, .5, .8, .8, .2]
    front = pareto(costs, values)
    # c is dominated by a (cheaper, better); d by b (same value, dearer); b and e are equal points, both kept
    assert front == [5, 0, 1, 4]
    assert pareto([], []) == []
    assert pareto([3, 3], [0.5, 0.7]) == [1]  # same cost: only the better one


def test_choose_for_budget_maximizes_success_then_speed():
    rows = [{"n": "slow_best", "p95": 50, "s": (40, 50)}, {"n": "fast_good", "p95": 12, "s": (36, 50)},
            {"n": "fast_same", "p95": 9, "s": (36, 50)}, {"n": "fastest_bad", "p95": 5, "s": (10, 50)}]
    pick = lambda b: choose_for_budget(rows, b, latency=lambda r: r["p95"], successes=lambda r: r["s"])  # noqa: E731
    assert pick(60)["row"]["n"] == "slow_best"
    assert pick(40)["row"]["n"] == "fast_same"  # equal success: the faster one
    assert pick(6)["row"]["n"] == "fastest_bad" and pick(6)["meets_budget"]
    none = pick(4)
    assert not none["meets_budget"] and none["row"]["n"] == "fastest_bad" and none["candidates"] == []
    with pytest.raises(ValueError, match="must be positive"):
        pick(0)
    assert pooled([30, 20], [50, 50])["rate"] == 0.5 and pooled([30, 20], [50, 50])["episodes"] == 100


def test_grid_turns_keep_into_updates_and_refuses_bad_entries():
    fc = compose_cfg("env=toy").frontier
    cells = frontier.grid(fc)
    labels = [c.label for c in cells]
    assert "ddim-10" in labels and "ddpm-100" in labels
    assert "ddim-10+bac[n_bubble=1,n_updates=5]" in labels and "ddim-25+uniform[n_updates=12]" in labels
    assert len(labels) == len(set(labels))
    bad = OmegaConf.merge(fc, {"caches": [{"name": "uniform", "keep": 1.5}]})
    with pytest.raises(ValueError, match="keep must be in"):
        frontier.grid(bad)
    with pytest.raises(ValueError, match="written sampler-K"):
        frontier.grid(OmegaConf.merge(fc, {"cached_on": ["ddim10"]}))
    with pytest.raises(ValueError, match="cells twice"):
        frontier.grid(OmegaConf.merge(fc, {"cached_on": ["ddim-10", "ddim-10"]}))
    with pytest.raises(ValueError, match="not in the grid"):
        frontier.select(cells, ["ddim-7"])


def test_analyse_marks_reference_interval_and_proxy_correlation():
    rows = [{"label": lab, "latency_ms": {"p50": lat, "p95": 1.2 * lat}, "success": pooled([s], [50]), "mse_vs_ddim100": e}
            for lab, lat, s, e in [("ref", 300, 40, 0.0), ("fast", 10, 39, 0.01), ("faster", 5, 10, 0.2),
                                   ("mid", 30, 35, 0.02)]]
    out = frontier.analyse(rows, "ref")
    assert out["pareto"] == ["faster", "fast", "ref"]
    assert out["fastest_within_reference"] == "fast" and "faster" not in out["within_reference"]
    assert out["proxy_spearman"]["mse_vs_ddim100"] == pytest.approx(1.0)
    recommended = {r["budget_ms"]: r["label"] for r in out["recommended"]}
    assert recommended[10] == "faster" and recommended[15] == "fast" and recommended[400] == "ref"
    # any proxy the rows carry is correlated (a flow VLA's are against flow-K), and named for the table
    for r, e in zip(rows, (0.0, 0.02, 0.3, 0.01)):
        r["mse_vs_flow100"] = e
    out = frontier.analyse(rows, "ref")
    assert set(out["proxy_spearman"]) == {"mse_vs_ddim100", "mse_vs_flow100"}
    from eval.frontier_report import proxy_name

    assert [proxy_name(k) for k in ("mse_vs_ddpm100", "mse_vs_ddim100", "mse_vs_flow10")] == ["DDPM-100", "DDIM-100",
                                                                                             "flow-10"]


def test_the_cross_task_summary_says_where_a_cache_earns_its_place(tmp_path):
    """Roles per task, caches on the Pareto set, and the strict test: a cache beats every uncached sampler only
    with success above their intervals at its latency, or the best one's success at 1.5x less latency."""
    from eval.frontier_report import beats_uncached, caches_on_front, main

    def row(label, lat, s, n=50, cache="none", start=0):
        return {"label": label, "sampler": label.split("-")[0], "cache": cache, "start": start,
                "latency_ms": {"p50": lat, "p95": 1.1 * lat},
                "success": pooled([s], [n])}

    rows = [row("ddpm-100", 300, 35), row("ddim-10", 30, 36), row("ddim-3", 10, 30), row("ddim-2", 8, 15),
            row("ddim-10+uniform", 9, 33, cache="uniform"),       # on the front (faster than ddim-3, more successful)
            row("ddim-10@k7", 12, 31, start=7),                    # dominated by the cache above
            row("ddim-8+bac", 9.5, 49, n=50, cache="bac")]         # above every uncached interval at 9.5 ms
    summary = frontier.analyse(rows, "ddpm-100")
    assert caches_on_front(rows, summary) == ["ddim-10+uniform", "ddim-8+bac"]
    # uniform is on the front but within ddim-3's noise (10 ms, 0.60 [0.46, 0.72]): not strictly better
    assert beats_uncached(rows) == ["ddim-8+bac"]
    faster = rows[:4] + [row("ddim-10+ertacache", 6, 30, cache="ertacache")]  # ddim-3's success at 1.67x less
    assert beats_uncached(faster) == ["ddim-10+ertacache"]
    (tmp_path / "lift").mkdir()
    (tmp_path / "lift" / "frontier.json").write_text(json.dumps({"rows": rows, "summary": summary}))
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- frontier:start -->\nold\n<!-- frontier:end -->\nafter\n")
    main([str(tmp_path / "lift"), "--out", str(doc), "--section", "frontier", "--plot", str(tmp_path / "f.png")])
    text = doc.read_text()
    assert text.startswith("intro") and text.endswith("after\n") and "old" not in text
    assert "| lift | reference | ddpm-100 | 0.70" in text and "| lift | DDIM-10 | ddim-10 |" in text
    assert "strictly better than every uncached sampler" in text and (tmp_path / "f.png").stat().st_size > 10_000
    with pytest.raises(FileNotFoundError, match="frontier.json is missing"):
        main([str(tmp_path / "nowhere")])


def test_a_choice_scene_reports_the_named_and_the_other_object_pooled(tmp_path):
    """Where the instruction names one of several objects, each cell's row pools the named and the other object
    handled over its seed sets, and the table shows them; a cell whose seed set lacks the counts shows none."""
    from eval.frontier_grid import Cell
    from eval.frontier_report import collect, write_report

    def summary(named, other, n=50, seed=0):
        return {"n_successes": named, "n_episodes": n, "seeds": [seed, seed + n - 1], "mean_episode_steps": 90.0,
                "language": {"n": n, "named_handled": named / n, "other_handled": other / n}}

    cells = [Cell("flow", 10), Cell("flow", 1), Cell("flow", 2)]
    for label, seed, s in [("flow-10", 0, summary(42, 2)), ("flow-10", 50, summary(38, 2, seed=50)),
                           ("flow-1", 0, summary(30, 9))]:
        (tmp_path / "cells" / label / f"s{seed}").mkdir(parents=True)
        (tmp_path / "cells" / label / f"s{seed}" / "summary.json").write_text(json.dumps(s))
    no_block = summary(40, 0)
    del no_block["language"]
    (tmp_path / "cells" / "flow-2" / "s0").mkdir(parents=True)
    (tmp_path / "cells" / "flow-2" / "s0" / "summary.json").write_text(json.dumps(no_block))
    latency = {"cells": {c.label: {"latency_ms": {"p50": 10.0 * c.K, "p95": 11.0 * c.K}, "flops_ratio": 1.0}
                         for c in cells}}
    rows = {r["label"]: r for r in collect(cells, tmp_path, latency)}
    assert rows["flow-10"]["named_handled"]["successes"] == 80 and rows["flow-10"]["named_handled"]["episodes"] == 100
    assert rows["flow-10"]["other_handled"]["successes"] == 4 and rows["flow-1"]["other_handled"]["successes"] == 9
    assert "other_handled" not in rows["flow-2"]
    cfg = OmegaConf.create({"env": {"name": "robomimic", "language": True, "task": "two_cubes"},
                            "policy": {"name": "vla", "checkpoint": "ckpt"},
                            "frontier": {"name": "vla", "n_episodes": 50}})
    write_report(cfg, list(rows.values()), frontier.analyse(list(rows.values()), "flow-10"), tmp_path, latency)
    table = (tmp_path / "frontier.md").read_text()
    assert "| named object handled [95% CI] | another handled |" in table
    assert "| flow-10 | 0.80 [0.71, 0.87] | 100 | 0.80 [0.71, 0.87] | 4/100 |" in table
    assert "| flow-1 | 0.60 [0.46, 0.72] | 50 | 0.60 [0.46, 0.72] | 9/50 |" in table
    assert "| flow-2 | 0.80 [0.67, 0.89] | 50 | - | - |" in table


@pytest.fixture(scope="module")
def calibrated(toy_checkpoint):
    """The toy checkpoint calibrated from its demos (writes calib_obs.npz and bench_obs.npz beside it)."""
    import eval.calibrate as calibrate

    data = toy_checkpoint.parent / "toy.hdf5"
    calibrate.calibrate(compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", f"calibrate.dataset={data}",
                                    "calibrate.n_obs=4", "calibrate.n_updates=[10]"))
    return toy_checkpoint


def test_calibration_for_a_new_sampler_and_k_loads_only_there(calibrated):
    """A fresh clone has no demos: a new (sampler, K) is calibrated on the checkpoint's calibration observations,
    and its schedules are refused by any other sampler or step count, naming the field."""
    import eval.calibrate as calibrate
    from bac.schedule import Schedule, ScheduleMismatch
    from policies import load_policy
    from policies.cache_target import make_cache, policy_signature

    out = calibrate.calibrate(compose_cfg("env=toy", f"policy.checkpoint={calibrated}", "policy.scheduler=ddim",
                                          "policy.num_inference_steps=6", "calibrate.n_updates=[3,8]"))
    assert out.name == "DDIMScheduler_K6.npz"
    written = sorted(p.name for p in (calibrated / "schedules").glob("*DDIM_K6.json"))
    assert "bac_S3_n1_cosine_DDIM_K6.json" in written and not any("_S8_" in n for n in written)  # S >= K: none
    schedule = Schedule.load(calibrated / "schedules" / "bac_S3_n1_cosine_DDIM_K6.json")
    ddim6 = load_policy(calibrated, scheduler="ddim", num_inference_steps=6)
    scheduler, K, model_hash = policy_signature(ddim6)
    schedule.check_compatible(num_steps=K, scheduler=scheduler, model_hash=model_hash)
    for other, field in (({"scheduler": "dpmsolver", "num_inference_steps": 6}, "scheduler"),
                         ({"scheduler": "ddim", "num_inference_steps": 8}, "num_steps")):
        policy = load_policy(calibrated, **other)
        with pytest.raises(ScheduleMismatch, match=field):
            make_cache(policy, calibrated, {"name": "bac", "n_updates": 3, "n_bubble": 1,
                                            "schedule": str(calibrated / "schedules" / "bac_S3_n1_cosine_DDIM_K6.json")})
    with pytest.raises(FileNotFoundError, match="DPMSolverMultistepScheduler_K6.npz is missing"):
        make_cache(load_policy(calibrated, scheduler="dpmsolver", num_inference_steps=6), calibrated,
                   {"name": "bac", "n_updates": 3, "n_bubble": 1})


def test_runner_skips_finished_cells_and_resumes_an_interrupted_one(calibrated, tmp_path, monkeypatch):
    toy_checkpoint = calibrated
    cfg = compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", f"frontier.out={tmp_path}",
                      "frontier.cached_on=[]", "frontier.warm_on=[]", "frontier.reference=ddim-3",
                      "frontier.n_episodes=4", "frontier.n_envs=2", "frontier.phase=rollouts")
    OmegaConf.set_struct(cfg, False)
    cfg.frontier.samplers = {"ddim": [2, 3]}  # a dict override on the command line would merge into the default
    real_simulate, calls = run.simulate, []

    def crash_in_third_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second cell's first batch: the first cell (two batches) is finished
            raise KeyboardInterrupt
        return real_simulate(*args, **kwargs)

    monkeypatch.setattr(run, "simulate", crash_in_third_batch)
    with pytest.raises(KeyboardInterrupt):
        frontier.frontier(cfg)
    first, second = tmp_path / "cells" / "ddim-2" / "s0", tmp_path / "cells" / "ddim-3" / "s0"
    assert (first / "summary.json").exists() and not (second / "summary.json").exists()
    kept = (first / "summary.json").read_text()
    # The second cell is interrupted in its second batch: its first two episodes are kept and not run again.
    calls.clear()

    def crash_in_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_simulate(*args, **kwargs)

    monkeypatch.setattr(run, "simulate", crash_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        frontier.frontier(cfg)
    assert len((second / "episodes.jsonl").read_text().splitlines()) == 2
    monkeypatch.setattr(run, "simulate", real_simulate)
    seen = []
    monkeypatch.setattr(run, "simulate", lambda envs, seeds, *a, **k: seen.append(list(seeds)) or real_simulate(envs, seeds, *a, **k))
    frontier.frontier(OmegaConf.merge(cfg, {"frontier": {"phase": "all", "trials": 1, "warmup": 0, "n_obs": 2}}))
    assert seen == [[2, 3]]  # only the missing seeds of the interrupted cell; the finished cell is skipped
    assert (first / "summary.json").read_text() == kept
    summary = json.loads((second / "summary.json").read_text())
    assert summary["n_episodes"] == 4 and summary["scheduler"] == "ddim" and summary["num_inference_steps"] == 3
    report = json.loads((tmp_path / "frontier.json").read_text())
    assert {r["label"] for r in report["rows"] if "success" in r} == {"ddim-2", "ddim-3"}
    assert (tmp_path / "frontier.png").stat().st_size > 10_000 and (tmp_path / "frontier.md").exists()
    # The budget tuner chooses over this frontier (cells timed again here), and run.py applies its choice.
    import eval.tune as tune

    base = ["env=toy", f"policy.checkpoint={toy_checkpoint}", f"tune.frontier={tmp_path / 'frontier.json'}",
            "tune.trials=2", "tune.warmup=0", "tune.n_obs=2"]
    rates = {r["label"]: r["success"]["rate"] for r in report["rows"]}
    choice = tune.tune(compose_cfg(*base, "loop.budget_ms=10000"), tmp_path / "tune")
    best = max(rates.values())
    assert choice["meets_budget"] and rates[choice["chosen"]["label"]] == best
    assert {r["label"] for r in choice["rows"]} == {"ddim-2", "ddim-3"}
    tight = tune.tune(compose_cfg(*base, "loop.budget_ms=0.001"), tmp_path / "tune2")
    assert not tight["meets_budget"]  # nothing is that fast: the fastest, flagged
    summary = run.evaluate(compose_cfg(*base, "loop.budget_ms=10000", "eval.n_episodes=2", "eval.n_envs=2",
                                       "eval.latency_trials=1"), tmp_path / "budget_run")
    assert summary["num_inference_steps"] == choice["chosen"]["num_inference_steps"] and summary["cache"] == "none"
    assert summary["budget"]["chosen"]["label"] == choice["chosen"]["label"]
    assert summary["budget"]["rows"] == choice["rows"]  # tune's recorded choice, taken as it was: not timed again
    with pytest.raises(ValueError, match="loop.budget_ms must be positive"):
        run.evaluate(compose_cfg(*base, "loop.budget_ms=0"), tmp_path / "bad")


def test_tuner_times_cached_and_warm_cells_of_a_frontier(calibrated, tmp_path):
    """The budget choice re-times every kind of cell: an online cache (whose FLOPs come from a run) and a warm start."""
    import eval.tune as tune

    def row(label, sampler, K, knobs=None, start=0, s=3):
        return {"label": label, "sampler": sampler, "K": K, "start": start, "cache": (knobs or {}).get("name", "none"),
                "knobs": knobs or {}, "latency_ms": {"p50": 1.0, "p95": 1.0}, "success": pooled([s], [5])}

    rows = [row("ddim-4+fbcache[threshold=0.5]", "ddim", 4, {"name": "fbcache", "threshold": 0.5}, s=5),
            row("ddim-4@k2", "ddim", 4, start=2, s=4), row("ddim-2", "ddim", 2)]
    (tmp_path / "frontier.json").write_text(json.dumps({"rows": rows}))
    cfg = compose_cfg("env=toy", f"policy.checkpoint={calibrated}", f"tune.frontier={tmp_path / 'frontier.json'}",
                      "tune.trials=2", "tune.warmup=0", "tune.n_obs=2", "loop.budget_ms=10000")
    choice = tune.tune(cfg, tmp_path / "tune")
    assert choice["chosen"]["label"] == "ddim-4+fbcache[threshold=0.5]"
    assert choice["chosen"]["cache"] == {"name": "fbcache", "threshold": 0.5}
    assert all(r["latency_now_ms"]["p95"] > 0 for r in choice["rows"])
    applied = tune.apply_choice(cfg, {"chosen": dict(choice["chosen"], warm_start=2)})
    assert applied.loop.warm_start == 2 and applied.cache.name == "fbcache" and applied.loop.budget_ms is None


def test_run_takes_the_budget_choice_that_tune_recorded(calibrated, tmp_path, monkeypatch):
    """eval/tune.py and loop.budget_ms give one answer: run.py takes the S that tune.py recorded for the same weights,
    method, budget and device, and times again only when asked (tune.retune) or when the record is too old."""
    import eval.tune as tune

    base = ["env=toy", f"policy.checkpoint={calibrated}", "cache=uniform", "tune.n_updates=[1,2]", "tune.trials=2",
            "tune.warmup=0", "tune.n_obs=2", "loop.budget_ms=10000", f"tune.records={tmp_path / 'records'}"]
    tuned = tune.tune(compose_cfg(*base), tmp_path / "tune")
    real, calls = tune.measure_budgets, []
    monkeypatch.setattr(tune, "measure_budgets", lambda *a, **k: calls.append(1) or real(*a, **k))
    rollout = ["eval.n_episodes=2", "eval.n_envs=2", "eval.latency_trials=1"]
    summary = run.evaluate(compose_cfg(*base, *rollout), tmp_path / "run")
    assert calls == [] and summary["budget"]["chosen"] == tuned["chosen"] and summary["budget"]["rows"] == tuned["rows"]
    run.evaluate(compose_cfg(*base, *rollout, "tune.retune=true"), tmp_path / "retune")
    assert calls == [1]
    run.evaluate(compose_cfg(*base, *rollout, "tune.max_age_h=0"), tmp_path / "stale")
    assert calls == [1, 1]
    other = run.evaluate(compose_cfg(*base, *rollout, "loop.budget_ms=9000"), tmp_path / "other_budget")
    assert calls == [1, 1, 1] and other["budget"]["budget_ms"] == 9000  # another budget is another record


def test_figures_go_to_docs_not_into_the_checkpoint(calibrated, tmp_path, monkeypatch):
    import eval.figures as figures

    before = sorted(p.name for p in calibrated.rglob("*"))
    monkeypatch.setattr(figures, "ROOT", tmp_path)  # the repository root the default path hangs off
    figures.main(["heatmaps", "--checkpoint", str(calibrated)])
    assert list((tmp_path / "docs" / "figures").glob("*_heatmaps_cosine.png"))
    assert sorted(p.name for p in calibrated.rglob("*")) == before
