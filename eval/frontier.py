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
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bac.metrics import latency_stats  # noqa: E402
from eval.frontier_report import analyse, collect, write_report  # noqa: E402,F401 (analyse: the report's rules)

CALIBRATED = ("unified_acs", "blockwise_acs", "bac", "profiling", "bac_forecast")


@dataclass(frozen=True)
class Cell:
    """One config of the grid: a sampler at K steps, uncached (``cache`` empty) or with a cache's knobs."""

    sampler: str
    K: int
    cache: tuple = ()  # sorted (knob, value) pairs, "name" among them
    start: int = 0  # warm start: each chunk starts from the previous one at step k0 = start (loop.warm_start)

    @property
    def name(self) -> str:
        return dict(self.cache).get("name", "none")

    @property
    def label(self) -> str:
        base = f"{self.sampler}-{self.K}" + (f"@k{self.start}" if self.start else "")
        if not self.cache:
            return base
        knobs = ",".join(f"{k}={v}" for k, v in self.cache if k != "name")
        return f"{base}+{self.name}" + (f"[{knobs}]" if knobs else "")

    def cache_cfg(self) -> dict:
        """The full cache config (the method's yaml defaults, then this cell's knobs)."""
        from eval.bench import method_defaults

        return {**method_defaults(self.name), **dict(self.cache)}


def cell_of(row: dict) -> Cell:
    """The cell a frontier row (``frontier.json``, ``latency.json``) describes."""
    return Cell(str(row["sampler"]), int(row["K"]), tuple(sorted(row.get("knobs", {}).items())), int(row.get("start", 0)))


def grid(fc) -> list[Cell]:
    """The cells of ``cfg.frontier``: uncached at every (sampler, K), then every cache on ``cached_on``."""
    cells = [Cell(s, int(K)) for s, Ks in fc.samplers.items() for K in Ks]
    for pair in fc.cached_on:
        sampler, K = parse_pair(pair)
        for entry in fc.caches:
            knobs = dict(OmegaConf.to_container(entry, resolve=True)) if not isinstance(entry, dict) else dict(entry)
            keep = knobs.pop("keep", None)
            if keep is not None:
                if not 0 < float(keep) <= 1:
                    raise ValueError(f"frontier.caches: keep must be in (0, 1], got {keep} in {entry}")
                knobs["n_updates"] = max(1, round(float(keep) * K))
            cells.append(Cell(sampler, K, tuple(sorted(knobs.items()))))
    for pair in fc.get("warm_on", []):
        sampler, K = parse_pair(pair)
        for keep in fc.get("warm_keep", []):
            if not 0 < float(keep) < 1:
                raise ValueError(f"frontier.warm_keep: the share of steps run must be in (0, 1), got {keep}")
            cells.append(Cell(sampler, K, start=K - max(1, round(float(keep) * K))))
    labels = [c.label for c in cells]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ValueError(f"frontier grid lists cells twice: {dupes}")
    return cells


def parse_pair(pair: str) -> tuple[str, int]:
    sampler, _, K = str(pair).rpartition("-")
    if not sampler or not K.isdigit():
        raise ValueError(f"a (sampler, K) pair is written sampler-K, e.g. ddim-10; got {pair!r}")
    return sampler, int(K)


def select(cells: list[Cell], only) -> list[Cell]:
    if only is None:
        return cells
    by_label = {c.label: c for c in cells}
    unknown = [lab for lab in only if lab not in by_label]
    if unknown:
        raise ValueError(f"frontier.only names cells {unknown} that are not in the grid; known: {sorted(by_label)}")
    return [by_label[lab] for lab in only]


# ---------------------------------------------------------------------------------------------------- latency
def ensure_calibrations(cfg: DictConfig, cells: list[Cell], checkpoint: Path) -> None:
    """Calibrate every (sampler, K) whose cells use a calibrated method and lack its calibration file."""
    from eval.calibrate import calibrate
    from policies import load_policy
    from policies.caching import calibration_path, policy_signature

    pairs = sorted({(c.sampler, c.K) for c in cells if c.name in CALIBRATED})
    for sampler, K in pairs:
        policy = load_policy(checkpoint, scheduler=sampler, num_inference_steps=K)
        scheduler, _, _ = policy_signature(policy)
        if calibration_path(checkpoint, scheduler, K).exists():
            continue
        print(f"calibrating {checkpoint} for {sampler}-{K}", flush=True)
        sub = copy.deepcopy(cfg)
        sub.policy.scheduler, sub.policy.num_inference_steps, sub.policy.checkpoint = sampler, K, str(checkpoint)
        calibrate(sub)


def measure(cells: list[Cell], checkpoint: Path, device, trials: int, warmup: int, n_obs: int,
            proxies: bool = True) -> dict:
    """Batch-1 latency (interleaved rounds), FLOPs ratio and, with ``proxies``, the action-error proxies of every
    cell, in this process: {label: {sampler, K, cache, knobs, latency_ms, flops_ratio, mse_vs_ddpm100, ...}}."""
    from eval.bench import load_bench_obs
    from policies import load_policy
    from policies.caching import disable_cache, enable_cache, make_cache

    refs_at = [("ddpm", 100), ("ddim", 100)] if proxies else []
    policies = {}
    for sampler, K in [(c.sampler, c.K) for c in cells] + refs_at:
        if (sampler, K) not in policies:
            policies[(sampler, K)] = load_policy(checkpoint, device, scheduler=sampler, num_inference_steps=K)
    any_policy = next(iter(policies.values()))
    obs = load_bench_obs(any_policy, checkpoint, n_obs)
    one = [{k: v[i : i + 1].to(device) for k, v in obs.items()} for i in range(next(iter(obs.values())).shape[0])]
    caches = {c.label: make_cache(policies[(c.sampler, c.K)], checkpoint, c.cache_cfg()) if c.cache else None
              for c in cells}

    def run(cell_policy, o, seed, start=0, init=None):
        gen = torch.Generator(device=device).manual_seed(seed)
        return cell_policy.predict_action(o, generator=gen, init_action=init, init_step=start)["action"]

    # A warm-started cell's guess: its own cold trajectory for the same observation, shifted by the Ta executed
    # actions as the loop shifts it (the next observation is not at hand offline).
    guesses = {}
    for c in cells:
        if c.start and (c.sampler, c.K) not in guesses:
            p = policies[(c.sampler, c.K)]
            Ta, T = p.config.n_action_steps, p.config.horizon
            idx = torch.clamp(torch.arange(T) + Ta, max=T - 1)
            guesses[(c.sampler, c.K)] = [p.predict_action(o, generator=torch.Generator(device=device).manual_seed(7))
                                         ["action_pred"][:, idx] for o in one]
    refs = {key: [run(policies[key], o, 1000 + i) for i, o in enumerate(one)] for key in refs_at}
    rows = {}
    for c in cells:
        p = policies[(c.sampler, c.K)]
        guess = guesses.get((c.sampler, c.K)) if c.start else None
        engine = enable_cache(p, caches[c.label]) if c.cache else None
        # With the proxies off, one run still goes first: an online strategy's FLOPs ratio is what it computed.
        acts = [run(p, o, 1000 + i, c.start, guess[i] if guess else None) for i, o in enumerate(one)
                if refs or (engine is not None and i == 0)]
        err = {f"mse_vs_{s}{K}": float(np.mean([(a - r).pow(2).mean().item() for a, r in zip(acts, refs[(s, K)])]))
               for s, K in refs}  # empty without proxies
        rows[c.label] = {"sampler": c.sampler, "K": c.K, "start": c.start, "cache": c.name, "knobs": dict(c.cache), **err,
                         "flops_ratio": round(engine.flops_ratio(), 4) if engine else 1.0, "times": []}
        if engine:
            disable_cache(p, engine)
    for r in range(warmup + trials):
        for c in cells:
            p = policies[(c.sampler, c.K)]
            engine = enable_cache(p, caches[c.label], profile=False) if c.cache else None
            guess = guesses[(c.sampler, c.K)][r % len(one)] if c.start else None
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(p, one[r % len(one)], r, c.start, guess)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                rows[c.label]["times"].append(time.perf_counter() - t0)
            if engine:
                disable_cache(p, engine)
    for row in rows.values():
        row["latency_ms"] = {k: round(v, 3) for k, v in latency_stats(row.pop("times")).items()}
    return rows


def latency_phase(cfg: DictConfig, cells: list[Cell], checkpoint: Path, out: Path) -> dict:
    from eval.run import device_name, pick_device, write_atomic

    path = out / "latency.json"
    have = json.loads(path.read_text()) if path.exists() else None
    if have and not cfg.frontier.retime and all(c.label in have["cells"] for c in cells):
        return have
    ensure_calibrations(cfg, cells, checkpoint)
    device = pick_device(str(cfg.device))
    t0 = time.time()
    fc = cfg.frontier
    rows = measure(cells, checkpoint, device, int(fc.trials), int(fc.warmup), int(fc.n_obs))
    result = {"meta": {"task": str(cfg.env.task), "checkpoint": str(cfg.policy.checkpoint), "device": device_name(device),
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
    from eval.run import resolve_path

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
