"""The success-latency frontier of one checkpoint: samplers x step counts x cache methods, measured alike.

    python eval/frontier.py env=robomimic env.task=can                       # latency, every missing cell, report
    python eval/frontier.py env=robomimic env.task=can frontier.phase=rollouts frontier.worker=1 frontier.n_workers=2
    python eval/frontier.py env=robomimic env.task=can frontier.seed=50      # a second seed set, pooled per cell
    python eval/frontier.py env=robomimic env.task=can frontier.phase=report

The grid (``configs/frontier/default.yaml``): every sampler at every step count K uncached, and every cache of
``frontier.caches`` on the (sampler, K) pairs of ``frontier.cached_on``. Three phases:

- latency: every cell's batch-1 ``predict_action`` in one process, in interleaved rounds (each round runs every
  cell once, so drift in machine load hits all alike), with the FLOPs ratio and two action-error proxies on
  held-out observations from identical noise: against the reference cell (DDPM-100) and against the ODE
  solution (DDIM-100). Writes ``latency.json``. Missing calibrations for cached (sampler, K) pairs are made
  first (``eval/calibrate.py`` on the checkpoint's calibration observations).
- calibrate (also part of latency): the calibrations the cached cells need, on their own, before parallel workers.
- rollouts: each cell's ``eval/run.py`` evaluation into ``cells/<label>/s<seed>/``. A cell with a
  ``summary.json`` is skipped; an interrupted one resumes from its ``episodes.jsonl``. Run it in several
  processes (``frontier.worker``/``n_workers``) to use every core.
- report: success pooled over seed sets with its 95% interval against p50/p95 latency, the Pareto set, the
  cells within the reference's interval, the proxies' rank correlation with success; ``frontier.json``,
  ``frontier.md`` and the plot ``frontier.png``.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from eval.common import bench_obs_file, device_name, pick_device, resolve_path, write_atomic  # noqa: E402
from eval.frontier_grid import CALIBRATED, Cell, cell_of, grid, parse_pair, select  # noqa: E402,F401 (the grid's API)
from eval.frontier_report import analyse, collect, write_report  # noqa: E402,F401 (analyse: the report's rules)
from eval.latency import PROXY_REFS, MachineLoad, measure_cells  # noqa: E402

# ---------------------------------------------------------------------------------------------------- latency
def ensure_calibrations(cfg: DictConfig, cells: list[Cell], checkpoint: Path) -> None:
    """Calibrate every (sampler, K) whose cells use a calibrated method and lack its calibration file."""
    from eval.calibrate import calibrate
    from policies import load_policy
    from policies.cache_target import calibration_path, policy_signature

    pairs = sorted({(c.sampler, c.K) for c in cells if c.name in CALIBRATED})
    for sampler, K in pairs:
        policy = load_policy(checkpoint, scheduler=sampler, num_inference_steps=K)
        if not hasattr(policy.cache_target(checkpoint), "cache_calibration"):
            continue  # a target that keeps no saved calibrations: bac calibrates when the cache is built
        scheduler, _, _ = policy_signature(policy)
        if calibration_path(checkpoint, scheduler, K).exists():
            continue
        print(f"calibrating {checkpoint} for {sampler}-{K}", flush=True)
        sub = copy.deepcopy(cfg)
        sub.policy.scheduler, sub.policy.num_inference_steps, sub.policy.checkpoint = sampler, K, str(checkpoint)
        calibrate(sub)


def latency_phase(cfg: DictConfig, cells: list[Cell], checkpoint: Path, out: Path) -> dict:
    path = out / "latency.json"
    have = json.loads(path.read_text()) if path.exists() else None
    if have and not cfg.frontier.retime and all(c.label in have["cells"] for c in cells):
        return have
    ensure_calibrations(cfg, cells, checkpoint)
    device = pick_device(str(cfg.device))
    t0 = time.time()
    fc = cfg.frontier
    with MachineLoad() as load:
        rows = measure_cells(cells, checkpoint, device, int(fc.trials), int(fc.warmup), int(fc.n_obs),
                             proxy_refs=list(fc.get("proxy_refs") or PROXY_REFS), task=str(cfg.env.task))
    if load.busy():
        print(f"note: other processes kept {load.other_busy_cores:.2f} CPUs busy while the cells were timed; "
              "their ratios hold (interleaved rounds), their milliseconds read high", flush=True)
    from policies import load_policy
    from policies.cache_target import policy_signature

    policy = load_policy(checkpoint, device)
    model_hash = policy_signature(policy)[2]  # the weights (any sampler, any K)
    bench_file = bench_obs_file(policy, checkpoint, str(cfg.env.task))
    result = {"meta": {"task": str(cfg.env.task), "checkpoint": str(cfg.policy.checkpoint), "model_hash": model_hash,
                       "bench_obs": bench_file.name, "conditions": load.record(),
                       "device": device_name(device),
                       "torch_threads": torch.get_num_threads(), "trials": int(cfg.frontier.trials),
                       "n_obs": int(cfg.frontier.n_obs), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "wall_s": round(time.time() - t0, 1)}, "cells": rows}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=2) + "\n")
    print(f"timed {len(rows)} cells in {time.time() - t0:.0f} s -> {path}", flush=True)
    return result


# --------------------------------------------------------------------------------------------------- rollouts
def cell_dir(out: Path, cell: Cell, seed: int) -> Path:
    return out / "cells" / cell.label / f"s{seed}"


def cell_cfg(cfg: DictConfig, cell: Cell, checkpoint: Path) -> DictConfig:
    """The eval/run.py config of one cell: the base config with the cell's sampler, K and cache."""
    fc = cfg.frontier
    sub = copy.deepcopy(cfg)
    OmegaConf.set_struct(sub, False)
    sub.policy.checkpoint = str(checkpoint)
    sub.policy.scheduler, sub.policy.num_inference_steps = cell.sampler, cell.K
    sub.cache = OmegaConf.create(cell.cache_cfg() if cell.cache else {"name": "none"})
    sub.eval.n_episodes, sub.eval.seed, sub.eval.n_envs = int(fc.n_episodes), int(fc.seed), int(fc.n_envs)
    sub.eval.video, sub.eval.resume, sub.eval.latency_trials = False, True, 5
    sub.loop.budget_ms, sub.loop.warm_start = None, cell.start
    return sub


def rollout_phase(cfg: DictConfig, cells: list[Cell], checkpoint: Path, out: Path, latency: dict | None) -> list[str]:
    """Run this worker's share of the cells without a summary; returns the labels that failed."""
    from eval.run import evaluate

    fc = cfg.frontier
    if not 0 <= int(fc.worker) < int(fc.n_workers):
        raise ValueError(f"frontier.worker must be in [0, n_workers={fc.n_workers}), got {fc.worker}")
    lat = (latency or {}).get("cells", {})
    first = list(fc.get("first") or [])
    # The cells named in frontier.first (the reference, the usual baseline) lead; then the cheapest first.
    order = sorted(cells, key=lambda c: (first.index(c.label) if c.label in first else len(first),
                                         lat.get(c.label, {}).get("latency_ms", {}).get("p50", c.K)))
    mine = order[int(fc.worker) :: int(fc.n_workers)]
    failed = []
    for i, cell in enumerate(mine):
        d = cell_dir(out, cell, int(fc.seed))
        if (d / "summary.json").exists():
            continue
        print(f"=== cell {cell.label} seeds {fc.seed}..{int(fc.seed) + int(fc.n_episodes) - 1} "
              f"({i + 1}/{len(mine)} of worker {fc.worker})", flush=True)
        try:
            evaluate(cell_cfg(cfg, cell, checkpoint), d)
        except Exception as e:  # one broken cell must not stop the others; its reason is kept beside it
            d.mkdir(parents=True, exist_ok=True)
            (d / "error.txt").write_text(f"{type(e).__name__}: {e}\n")
            print(f"cell {cell.label} failed: {type(e).__name__}: {e}", flush=True)
            failed.append(cell.label)
    return failed


def frontier(cfg: DictConfig) -> dict:
    torch.set_num_threads(int(cfg.threads))
    fc = cfg.frontier
    if fc.phase not in ("all", "calibrate", "latency", "rollouts", "report"):
        raise ValueError(f"frontier.phase must be all, calibrate, latency, rollouts or report, got {fc.phase!r}")
    if int(fc.n_episodes) < 1:
        raise ValueError(f"frontier.n_episodes must be >= 1, got {fc.n_episodes}")
    checkpoint = resolve_path(cfg.policy.checkpoint)
    out = Path(str(fc.out)) if Path(str(fc.out)).is_absolute() else ROOT / str(fc.out)
    cells = grid(fc)
    if str(fc.reference) not in [c.label for c in cells]:
        raise ValueError(f"frontier.reference {fc.reference!r} is not a cell of the grid")
    chosen = select(cells, fc.only)
    latency = None
    if fc.phase == "calibrate":  # before parallel rollout workers, which must not calibrate the same pair at once
        ensure_calibrations(cfg, cells, checkpoint)
        return {}
    if fc.phase in ("all", "latency"):
        latency = latency_phase(cfg, cells, checkpoint, out)
    elif (out / "latency.json").exists():
        latency = json.loads((out / "latency.json").read_text())
    failed = []
    if fc.phase in ("all", "rollouts"):
        failed = rollout_phase(cfg, chosen, checkpoint, out, latency)
    result = {}
    if fc.phase in ("all", "report"):
        rows = collect(cells, out, latency)
        result = analyse(rows, str(fc.reference))
        write_report(cfg, rows, result, out, latency)
    if failed:
        raise RuntimeError(f"cells failed (reasons in their error.txt): {failed}")
    return result


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    frontier(cfg)


if __name__ == "__main__":
    main()
