"""Batch-1 latency of a policy's ``predict_action``, measured for the rollouts, the budget tuner and the frontier.

All three go through ``bac.timing.time_interleaved`` (as eval/bench.py does): every config once per round, warm-up
rounds dropped, caches attached and detached off the clock so that an uncached config runs with no engine at all.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from bac.metrics import latency_stats
from bac.timing import Timed, device_sync, time_interleaved
from eval.common import as_torch, load_bench_obs, slice_obs
from eval.frontier_grid import Cell, parse_pair
from policies import load_policy
from policies.cache_target import disable_cache, enable_cache, make_cache, make_schedule


def _busy_cpu_s() -> float | None:
    """Seconds of CPU time the whole machine has spent busy since boot (Linux /proc/stat), None elsewhere."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(x) for x in fields]  # user nice system idle iowait irq softirq steal ...
    busy = ticks[0] + ticks[1] + ticks[2] + sum(ticks[5:8])
    return busy / os.sysconf("SC_CLK_TCK")


class MachineLoad:
    """What else ran on the machine while a block was timed: ``other_busy_cores``, the CPU time of every other process
    over the block's wall time (in cores; /proc/stat, so Linux only, None elsewhere), beside ``cpus`` and the 1-minute
    load average. Latencies timed beside another busy process read up to 2x the quiet ones on this project's CPU
    machines, so a summary says under which conditions its latency was timed.

        with MachineLoad() as load:
            times = measure_latency(...)
        load.record()  # {"other_busy_cores": 0.97, "cpus": 2, "load_avg_1m": 1.4}
    """

    def __enter__(self) -> "MachineLoad":
        self.busy0, self.own0, self.wall0 = _busy_cpu_s(), time.process_time(), time.perf_counter()
        self.other_busy_cores = None
        return self

    def __exit__(self, *exc) -> None:
        busy1, own, wall = _busy_cpu_s(), time.process_time() - self.own0, time.perf_counter() - self.wall0
        if self.busy0 is not None and busy1 is not None and wall > 0:
            self.other_busy_cores = max(0.0, (busy1 - self.busy0 - own) / wall)
        self.load_avg_1m = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # at the block's end, not later

    def record(self) -> dict:
        return {"other_busy_cores": None if self.other_busy_cores is None else round(self.other_busy_cores, 2),
                "cpus": os.cpu_count(), "load_avg_1m": None if self.load_avg_1m is None else round(self.load_avg_1m, 2)}

    def busy(self, threshold: float = 0.5) -> bool:
        """Whether other processes kept at least ``threshold`` of a core busy while the block ran."""
        return self.other_busy_cores is not None and self.other_busy_cores >= threshold


def measure_latency(policy, sample_obs: dict[str, np.ndarray], trials: int, seed: int, warm_start: int = 0,
                    split: dict[str, float] | None = None) -> list[float]:
    """Seconds per batch-1 ``predict_action`` on observations seen in the rollout (2 warm-up calls dropped); with
    ``warm_start`` = k0, the warm-started call (its guess, made off the clock: a cold prediction for the same
    observation). ``split`` (a dict, for a policy whose ``predict_action`` takes ``timings``: the VLA) gets the
    median ms of each part of those same timed calls (``prefix``, ``expert``), so the split and the latency it
    splits are measured together, not in two runs that another process can load differently."""
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    n = next(iter(sample_obs.values())).shape[0]
    call, parts = {}, []

    def before(i: int) -> None:
        call["obs"] = as_torch({k: v[i % n : i % n + 1] for k, v in sample_obs.items()})
        call["init"] = policy.predict_action(call["obs"], generator=gen)["action_pred"] if warm_start else None

    def run(i: int) -> None:
        kw = {} if split is None else {"timings": {}}
        if warm_start:
            policy.predict_action(call["obs"], generator=gen, init_action=call["init"], init_step=warm_start, **kw)
        else:  # (a policy without warm starts, the VLA, takes no init_action)
            policy.predict_action(call["obs"], generator=gen, **kw)
        if split is not None:
            parts.append(kw["timings"])

    times = time_interleaved([Timed("policy", run, before)], trials, 2, device_sync(policy.device))["policy"]
    if split is not None:
        kept = parts[len(parts) - len(times):]  # the warm-up calls' parts dropped, as their times are
        split.update({k.removesuffix("_s"): round(1e3 * float(np.median([r[k] for r in kept])), 2) for k in kept[0]})
    return times


def measure_budgets(policy, checkpoint: Path, method: str, budgets: list[int], obs: list[dict], trials: int,
                    warmup: int = 2, n_bubble: int = 5, metric: str = "cosine") -> list[dict]:
    """Batch-1 latency of the uncached policy and of ``method`` at each S in ``budgets``, interleaved rounds.

    Returns one row per config: ``n_updates`` (K for the uncached one), ``cache``, ``latency_ms`` (p50/p95/p99),
    ``hz`` (1000 / p95: the chunk rate the device sustains), ``flops_ratio``.
    """
    K = policy.config.num_inference_steps
    configs = [("none", K, None)]
    for S in sorted({int(s) for s in budgets}):
        if not 1 <= S <= K:
            raise ValueError(f"tune.n_updates holds S={S}; every S must be in [1, {K}] (the policy's step count)")
        if S < K:
            configs.append((method, S, make_schedule(policy, checkpoint, method, n_updates=S, n_bubble=n_bubble,
                                                     metric=metric)))
    flops, state = {}, {}

    def timed(S: int, schedule) -> Timed:
        def before(r: int) -> None:
            state["engine"] = enable_cache(policy, schedule, profile=(r == 0)) if schedule is not None else None
            if state["engine"] is not None and r == 0:
                flops[S] = state["engine"].flops_ratio()
            state["gen"] = torch.Generator(device=policy.device).manual_seed(r)

        def run(r: int) -> None:
            policy.predict_action(obs[r % len(obs)], generator=state["gen"])

        def after(r: int) -> None:
            if state["engine"] is not None:
                disable_cache(policy, state["engine"])

        return Timed(str(S), run, before, after)

    times = time_interleaved([timed(S, sch) for _, S, sch in configs], trials, warmup, device_sync(policy.device))
    rows = []
    for name, S, _ in configs:
        lat = {k: round(v, 2) for k, v in latency_stats(times[str(S)]).items()}
        rows.append({"cache": name, "n_updates": S, "latency_ms": lat, "hz": round(1000.0 / lat["p95"], 2),
                     "flops_ratio": round(flops.get(S, 1.0), 4)})
    return rows


PROXY_REFS = ("ddpm-100", "ddim-100")


def measure_cells(cells: list[Cell], checkpoint: Path, device, trials: int, warmup: int, n_obs: int,
                  proxies: bool = True, proxy_refs=PROXY_REFS, task: str | None = None) -> dict:
    """Batch-1 latency (interleaved rounds), FLOPs ratio and, with ``proxies``, the action-error proxies of every
    frontier cell, in this process: {label: {sampler, K, cache, knobs, latency_ms, flops_ratio, mse_vs_ddpm100, ...}}.
    The proxies: the error of each cell's chunk against each sampler-K of ``proxy_refs`` from identical noise on
    held-out observations of ``task`` (DP-T: DDPM-100 and DDIM-100, the ODE's solution; a flow VLA: flow-100)."""
    refs_at = [parse_pair(r) for r in proxy_refs] if proxies else []
    policies = {}
    for sampler, K in [(c.sampler, c.K) for c in cells] + refs_at:
        if (sampler, K) not in policies:
            policies[(sampler, K)] = load_policy(checkpoint, device, scheduler=sampler, num_inference_steps=K)
    any_policy = next(iter(policies.values()))
    obs = load_bench_obs(any_policy, checkpoint, n_obs, task)
    one = [slice_obs(obs, i, device) for i in range(next(iter(obs.values())).shape[0])]
    caches = {c.label: make_cache(policies[(c.sampler, c.K)], checkpoint, c.cache_cfg()) if c.cache else None
              for c in cells}

    def run(cell_policy, o, seed, start=0, init=None):
        gen = torch.Generator(device=device).manual_seed(seed)
        warm = {"init_action": init, "init_step": start} if start else {}  # (a policy without warm starts takes none)
        return cell_policy.predict_action(o, generator=gen, **warm)["action"]

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
                         "flops_ratio": round(engine.flops_ratio(), 4) if engine else 1.0}
        if engine:
            disable_cache(p, engine)
    state = {}

    def timed(c: Cell) -> Timed:
        p = policies[(c.sampler, c.K)]

        def before(r: int) -> None:
            state["engine"] = enable_cache(p, caches[c.label], profile=False) if c.cache else None
            state["guess"] = guesses[(c.sampler, c.K)][r % len(one)] if c.start else None

        def after(r: int) -> None:
            if state["engine"] is not None:
                disable_cache(p, state["engine"])

        return Timed(c.label, lambda r: run(p, one[r % len(one)], r, c.start, state["guess"]), before, after)

    times = time_interleaved([timed(c) for c in cells], trials, warmup, device_sync(device))
    for label, row in rows.items():
        row["latency_ms"] = {k: round(v, 3) for k, v in latency_stats(times[label]).items()}
    return rows
