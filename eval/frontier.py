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

from bac.frontier import choose_for_budget, pareto, pooled  # noqa: E402
from bac.metrics import latency_stats  # noqa: E402

CALIBRATED = ("unified_acs", "blockwise_acs", "bac", "profiling", "bac_forecast")
BUDGETS_MS = (10, 15, 20, 30, 40, 60, 100, 200, 400)  # the report's recommended config per p95 budget


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


# ----------------------------------------------------------------------------------------------------- report
def collect(cells: list[Cell], out: Path, latency: dict | None) -> list[dict]:
    """One row per cell: pooled success over its seed sets (only full runs: a folder with a summary.json), and
    its latency, FLOPs and proxies from ``latency.json``."""
    lat = (latency or {}).get("cells", {})
    rows = []
    for c in cells:
        summaries = []
        for f in sorted((out / "cells" / c.label).glob("s*/summary.json")):
            try:
                summaries.append(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError) as e:
                print(f"skipping {f}: {e}", flush=True)
        row = {"label": c.label, "sampler": c.sampler, "K": c.K, "start": c.start, "cache": c.name, "knobs": dict(c.cache),
               **{k: v for k, v in lat.get(c.label, {}).items() if k not in ("sampler", "K", "start", "cache", "knobs")}}
        if summaries:
            row["success"] = pooled([s["n_successes"] for s in summaries], [s["n_episodes"] for s in summaries])
            row["seed_sets"] = [s["seeds"] for s in summaries]
            row["mean_episode_steps"] = round(float(np.mean([s["mean_episode_steps"] for s in summaries])), 1)
        rows.append(row)
    return rows


def analyse(rows: list[dict], reference: str) -> dict:
    """Pareto set (p50 latency against pooled success), the cells at or above the reference's lower interval
    bound, the fastest of those, and each proxy's Spearman rank correlation with success."""
    done = [r for r in rows if "success" in r and "latency_ms" in r]
    front = [done[i]["label"] for i in pareto([r["latency_ms"]["p50"] for r in done],
                                              [r["success"]["rate"] for r in done])]
    ref = next((r for r in done if r["label"] == reference), None)
    within = []
    if ref is not None:
        lo = ref["success"]["ci95"][0]
        within = sorted((r for r in done if r["success"]["rate"] >= lo), key=lambda r: r["latency_ms"]["p50"])
    proxies = {}
    for key in ("mse_vs_ddpm100", "mse_vs_ddim100"):
        pts = [(r[key], r["success"]["rate"]) for r in done if key in r]
        if len(pts) >= 3:
            proxies[key] = round(spearman([-a for a, _ in pts], [b for _, b in pts]), 3)
    recommended = []
    for budget in BUDGETS_MS:
        if done:
            pick = choose_for_budget(done, budget, latency=lambda r: r["latency_ms"]["p95"],
                                     successes=lambda r: (r["success"]["successes"], r["success"]["episodes"]))
            if pick["meets_budget"]:
                recommended.append({"budget_ms": budget, "label": pick["row"]["label"],
                                    "success": pick["row"]["success"], "p95_ms": pick["row"]["latency_ms"]["p95"]})
    return {"pareto": front, "reference": reference, "recommended": recommended,
            "reference_ci95": ref["success"]["ci95"] if ref else None,
            "within_reference": [r["label"] for r in within],
            "fastest_within_reference": within[0]["label"] if within else None,
            "proxy_spearman": proxies, "n_cells_done": len(done)}


def spearman(a, b) -> float:
    """Spearman's rank correlation (average ranks for ties)."""
    def ranks(x):
        x = np.asarray(x, dtype=float)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):  # ties share their mean rank
            r[x == v] = r[x == v].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def write_report(cfg: DictConfig, rows: list[dict], summary: dict, out: Path, latency: dict | None) -> None:
    from eval.run import write_atomic

    meta = (latency or {}).get("meta", {})
    write_atomic(out / "frontier.json", json.dumps({"meta": meta, "summary": summary, "rows": rows}, indent=2) + "\n")
    front = set(summary["pareto"])
    within = set(summary["within_reference"])
    lines = [f"# Frontier: {cfg.env.task}", "",
             f"`python eval/frontier.py env={cfg.env.name} env.task={cfg.env.task}` — success over "
             f"{cfg.frontier.n_episodes}-episode seed sets (pooled where a cell has several), batch-1 latency of one "
             f"action chunk timed in one process in {meta.get('trials', '?')} interleaved rounds on "
             f"{meta.get('device', '?')}. ★ Pareto set; ✓ success at or above the lower end of "
             f"{summary['reference']}'s 95% interval {summary['reference_ci95']}.", "",
             "| config | success [95% CI] | episodes | p50 ms | p95 ms | FLOPs | MSE vs DDPM-100 | MSE vs DDIM-100 | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r.get("latency_ms", {}).get("p50", float("inf"))):
        s = r.get("success")
        succ = f"{s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]" if s else "not run"
        lat = r.get("latency_ms", {})
        mark = ("★" if r["label"] in front else "") + ("✓" if r["label"] in within else "")
        lines.append(f"| {r['label']} | {succ} | {s['episodes'] if s else 0} | {lat.get('p50', float('nan')):.1f} | "
                     f"{lat.get('p95', float('nan')):.1f} | {r.get('flops_ratio', float('nan')):.3f} | "
                     f"{r.get('mse_vs_ddpm100', float('nan')):.2e} | {r.get('mse_vs_ddim100', float('nan')):.2e} | "
                     f"{mark} |")
    lines += ["", "Recommended per latency budget (the highest measured success whose frontier p95 meets the budget, "
              "the faster on a tie; `eval/tune.py` re-times the candidates on the device it runs on):", "",
              "| p95 budget | config | success [95% CI] | p95 ms |", "|---|---|---|---|"]
    for rec in summary["recommended"]:
        s = rec["success"]
        lines.append(f"| {rec['budget_ms']} ms | {rec['label']} | {s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] | "
                     f"{rec['p95_ms']:.1f} |")
    lines += ["", f"Pareto set (fastest first): {', '.join(summary['pareto']) or '-'}.",
              f"Fastest config within {summary['reference']}'s interval: {summary['fastest_within_reference'] or '-'}.",
              "Rank correlation of each action-error proxy (lower error = better) with rollout success over the "
              f"{summary['n_cells_done']} cells: " + (", ".join(f"{k} {v:+.2f}" for k, v in summary["proxy_spearman"].items())
                                                     or "-") + ".", ""]
    write_atomic(out / "frontier.md", "\n".join(lines))
    plot(rows, summary, out / "frontier.png", str(cfg.env.task))
    print("\n".join(lines), flush=True)


def plot(rows: list[dict], summary: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "success" in r and "latency_ms" in r]
    if not done:
        return
    colors = {"ddpm": "tab:red", "ddim": "tab:blue", "dpmsolver": "tab:green", "unipc": "tab:purple"}
    markers = {"none": "o", "uniform": "s", "bac": "D", "ertacache": "^", "fbcache": "v", "teacache": "P"}
    fig, ax = plt.subplots(figsize=(12, 6))
    ref = next((r for r in done if r["label"] == summary["reference"]), None)
    if ref is not None:
        lo, hi = ref["success"]["ci95"]
        ax.axhspan(lo, hi, color="0.9", zorder=0, label=f"{summary['reference']} 95% interval")
    seen = set()
    for r in done:
        x, s = r["latency_ms"]["p50"], r["success"]
        lo, hi = s["ci95"]
        warm = bool(r.get("start"))
        key = (r["sampler"], r["cache"], warm)
        name = r["sampler"] + (" + warm start" if warm else "") + ("" if r["cache"] == "none" else f" + {r['cache']}")
        ax.errorbar(x, s["rate"], yerr=[[s["rate"] - lo], [hi - s["rate"]]],
                    fmt="*" if warm else markers.get(r["cache"], "X"), color=colors.get(r["sampler"], "k"),
                    ms=9 if warm else 6, capsize=2, alpha=0.85, label=None if key in seen else name)
        seen.add(key)
        if (r["cache"] == "none" and not warm) or r["label"] in summary["pareto"]:
            ax.annotate(r["label"].split("[")[0].replace("+", "\n+"), (x, s["rate"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=6)
    front = [next(r for r in done if r["label"] == lab) for lab in summary["pareto"]]
    ax.step([r["latency_ms"]["p50"] for r in front], [r["success"]["rate"] for r in front], where="post",
            color="k", lw=1, ls="--", label="Pareto front")
    ax.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xticks([t for t in (2, 5, 10, 20, 50, 100, 200, 500) if t <= 2 * max(r["latency_ms"]["p50"] for r in done)])
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    xs = [r["latency_ms"]["p50"] for r in done]
    ax.set_xlim(min(xs) / 1.25, max(xs) * 1.4)
    ax.set_xlabel("batch-1 latency per action chunk, p50 (ms, log scale)")
    ax.set_ylabel("success rate (95% Wilson interval)")
    ax.set_title(f"{task}: success against latency over samplers, step counts and caches")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


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
