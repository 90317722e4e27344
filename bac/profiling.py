"""Offline fits of the literature's calibrated caching methods, from uncached trajectories.

A *trajectory* is what the engine's recording gives for one uncached sampling run over a batch of calibration
observations: every block's output at every step, ``features[name]`` of shape (K, N, T, C), and the stream
entering the first block, ``first_input`` (K, N, T, C). Everything here is numpy/torch arithmetic on those
arrays; nothing knows which model made them.

  fit_teacache   TeaCache's rescaling polynomial: input change -> change of the stack's residual
  fit_hyca       HyCa's channel groups and a solver per group for a given mask
  erta_schedule  ERTACache's profiled reusable steps (one whole-step mask for all blocks)
  fit_erta       ERTACache's per-block, per-step linear residual correction
  static masks   delta_dit_schedule, profiling_schedule, interval_schedule (FORA and the forecasters' mask)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from bac.blocks import BlockInfo
from bac.schedule import Schedule
from bac.forecasters import Forecaster
from bac.strategies import rel_l1


def _rel_l1(cur: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """``bac.strategies.rel_l1`` (per-sample relative L1 change) on numpy arrays."""
    return rel_l1(torch.from_numpy(np.asarray(cur)), torch.from_numpy(np.asarray(prev))).numpy()


def stack_residual(features: dict[str, np.ndarray]) -> np.ndarray:
    """The whole stack's residual at every step: the sum of every block's delta, (K, N, T, C) float64.

    Blocks on one residual stream have one shape. Where they do not (several stacks or streams: Latte's spatial
    and temporal blocks, joint attention's two streams), the blocks of each shape are summed and the sums are
    put side by side per sample, (K, N, D), or per step, (K, 1, D), where their sample dims differ."""
    groups: dict[tuple, np.ndarray] = {}
    for f in features.values():
        f = np.asarray(f, dtype=np.float64)
        groups[f.shape] = groups[f.shape] + f if f.shape in groups else f
    if len(groups) == 1:
        return next(iter(groups.values()))
    n = {g.shape[1] for g in groups.values()}
    N = n.pop() if len(n) == 1 else 1
    return np.concatenate([g.reshape(g.shape[0], N, -1) for g in groups.values()], axis=2)


def fit_teacache(first_input: np.ndarray, features: dict[str, np.ndarray], degree: int = 4) -> dict:
    """Fit ``P`` with ``P(rel-L1 of the first block's input) ≈ rel-L1 of the stack residual`` between consecutive
    steps, over all steps and observations (TeaCache's calibration as its authors describe it in their issue #2).
    Returns the coefficients (highest power first) and the fit's range and R²."""
    residual = stack_residual(features)
    xs = [_rel_l1(first_input[k], first_input[k - 1]) for k in range(1, len(first_input))]
    ys = [_rel_l1(residual[k], residual[k - 1]) for k in range(1, len(residual))]
    if xs and xs[0].shape != ys[0].shape:  # samples do not line up (the residual spans stacks): one point per step
        xs, ys = [x.mean(keepdims=True) for x in xs], [y.mean(keepdims=True) for y in ys]
    x, y = np.concatenate(xs), np.concatenate(ys)
    coeffs = np.polyfit(x, y, degree)
    pred = np.polyval(coeffs, x)
    r2 = 1.0 - float(((y - pred) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-30))
    return {"coeffs": coeffs.tolist(), "x_range": [float(x.min()), float(x.max())], "r2": r2,
            "mean_rescaled_per_step": float(np.clip(pred, 0, None).mean())}


def interval_schedule(blocks: Sequence[str], K: int, interval: int, warmup: int = 1, method: str = "fora",
                      **meta) -> Schedule:
    """All blocks compute at the first ``warmup`` steps and every ``interval`` steps after step 0 (FORA, arXiv 2407.01425: a static
    interval; TaylorSeer's ``first_enhance`` warm-up)."""
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    steps = sorted(set(range(min(max(warmup, 1), K))) | set(range(0, K, interval)))
    names = list(blocks)
    return Schedule(names, {b: steps for b in names}, K, method, n_updates=len(steps), **meta)


def delta_dit_schedule(blocks: Sequence[BlockInfo], K: int, interval: int, n_cached_layers: int,
                       boundary: float = 0.5, **meta) -> Schedule:
    """Δ-DiT (arXiv 2406.01125): before the boundary step ``b = round(boundary K)`` the rear ``n_cached_layers``
    layers are cached (they shape details, which early steps do not settle), after it the front ones (outlines,
    settled late); a cached span computes every ``interval`` steps (its first step in each stage included)
    and reuses its residual in between. Reusing each block's delta on the current stream is exactly reusing
    the span's residual ``Δ = span(x) - x``, since the span's residual is the sum of its blocks' deltas."""
    layers = sorted({b.layer for b in blocks})
    if not 0 <= n_cached_layers <= len(layers):
        raise ValueError(f"n_cached_layers must be in [0, {len(layers)}], got {n_cached_layers}")
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    b_step = int(round(boundary * K))
    rear, front = set(layers[len(layers) - n_cached_layers:]), set(layers[:n_cached_layers])
    early = set(range(0, b_step, interval))
    late = set(range(b_step, K, interval))
    steps = {}
    for info in blocks:
        s = set(range(K))
        if n_cached_layers and info.layer in rear:
            s -= set(range(b_step)) - early
        if n_cached_layers and info.layer in front:
            s -= set(range(b_step, K)) - late
        steps[info.name] = sorted(s | {0})
    return Schedule([b.name for b in blocks], steps, K, "delta_dit", **meta)


def profiling_schedule(blocks: Sequence[BlockInfo], errors: Sequence[float], K: int, n_always: int, interval: int,
                       warmup: int, **meta) -> Schedule:
    """ProfilingDiT (arXiv 2504.03140, ICCV 2025): the ``n_always`` blocks whose features change most across steps
    (the Bubbling Union's drift score, mean pairwise L1 from calibration) always compute, the others compute
    during the first ``warmup`` steps and then every ``interval`` steps. ProfilingDiT splits blocks by where
    their attention looks (foreground/background); a robot policy's tokens have no such split, so the profile
    here is how much each block's output moves."""
    order = np.argsort(-np.asarray(errors, dtype=np.float64), kind="stable")
    always = {blocks[i].name for i in order[:n_always]}
    base = sorted(set(range(min(warmup, K))) | set(range(0, K, max(interval, 1))))
    steps = {b.name: list(range(K)) if b.name in always else base for b in blocks}
    calibration = dict(meta.pop("calibration", {}))
    calibration["always"] = sorted(always)
    return Schedule([b.name for b in blocks], steps, K, "profiling", calibration=calibration, **meta)


def erta_schedule(blocks: Sequence[str], features: dict[str, np.ndarray], n_updates: int, **meta) -> Schedule:
    """ERTACache's offline step selection (arXiv 2508.21091): from the uncached trajectory, the per-step
    relative change of the whole stack's residual; a step is computed when the change accumulated since the last
    computed step reaches a threshold, chosen by bisection so that about ``n_updates`` steps compute (first and
    last always). The same steps for every block: ERTACache caches the whole step. Its third part, a
    trajectory-aware adjustment of the timestep on cached steps, changes the sampler's grid, which a cache
    engine attached to the denoiser does not own; it is left out."""
    residual = stack_residual(features)
    K = residual.shape[0]
    drift = np.array([0.0] + [float(_rel_l1(residual[k], residual[k - 1]).mean()) for k in range(1, K)])

    def steps_for(tau):
        steps, acc = [0], 0.0
        for k in range(1, K - 1):
            acc += drift[k]
            if acc >= tau:
                steps.append(k)
                acc = 0.0
        return steps + ([K - 1] if K > 1 else [])

    lo, hi = 0.0, float(drift.sum()) + 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if len(steps_for(mid)) > n_updates:
            lo = mid
        else:
            hi = mid
    steps = steps_for(hi)
    names = list(blocks)
    calibration = dict(meta.pop("calibration", {}))
    calibration["threshold"] = hi
    return Schedule(names, {b: steps for b in names}, K, "ertacache", n_updates=n_updates,
                    calibration=calibration, **meta)


def fit_erta(schedule: Schedule, features: dict[str, np.ndarray], blocks: Sequence[str], clip: float = 2.0) -> np.ndarray:
    """ERTACache's residual linearisation: per block and skipped step, the closed-form least-squares ``α`` with
    ``F(k) - F(k1) ≈ α (k - k1)/(k1 - k0) (F(k1) - F(k0))`` on the uncached trajectory (k1, k0 the last two
    computed steps before k), clipped to [0, clip]. Returns (n_blocks, K) in ``blocks`` order."""
    K = schedule.num_steps
    alpha = np.zeros((len(blocks), K))
    for i, name in enumerate(blocks):
        F = np.asarray(features[name], dtype=np.float64)
        done = schedule.steps[name]
        for k in range(K):
            prev = [s for s in done if s < k]
            if k in done or len(prev) < 2:
                continue
            k0, k1 = prev[-2], prev[-1]
            D = (F[k1] - F[k0]) * ((k - k1) / (k1 - k0))
            den = float((D * D).sum())
            if den > 0:
                alpha[i, k] = float(np.clip((D * (F[k] - F[k1])).sum() / den, 0.0, clip))
    return alpha


def _kmeans(x: np.ndarray, n: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Labels of ``x`` (M, d) in ``n`` k-means groups (numpy, k-means++ seeding)."""
    rng = np.random.default_rng(seed)
    n = min(n, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, n):
        d = np.min([((x - c) ** 2).sum(1) for c in centres], axis=0)
        p = d / d.sum() if d.sum() > 0 else None
        centres.append(x[rng.choice(len(x), p=p)])
    centres = np.stack(centres)
    for _ in range(iters):
        labels = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1)
        new = np.stack([x[labels == j].mean(0) if (labels == j).any() else centres[j] for j in range(n)])
        if np.allclose(new, centres):
            break
        centres = new
    return labels


def forecast_errors(F: np.ndarray, mask: Sequence[bool], forecaster: Forecaster) -> np.ndarray:
    """Per-channel squared error of ``forecaster`` on trajectory ``F`` (K, ..., C) under ``mask`` (K,): it sees
    the true values at computed steps and forecasts the skipped ones. Returns (C,)."""
    Ft = torch.from_numpy(np.asarray(F, dtype=np.float32))
    forecaster.reset(1)
    err = torch.zeros(Ft.shape[-1], dtype=torch.float64)
    seen = False
    for k in range(Ft.shape[0]):
        if mask[k] or not seen:
            forecaster.push(0, k, Ft[k])
            seen = True
        else:
            d = (forecaster.predict(0, k) - Ft[k]).double()
            err += d.pow(2).reshape(-1, d.shape[-1]).sum(0)
    return err.numpy()


def fit_hyca(features: dict[str, np.ndarray], schedule: Schedule, pool: Sequence[Forecaster], blocks: Sequence[str],
             n_groups: int = 8, seed: int = 0) -> tuple[list[np.ndarray], dict]:
    """HyCa's offline step: per block, group its channels by their dynamics (k-means on each channel's
    trajectory over the steps, mean over observations and tokens, standardised) and give every group the
    solver of ``pool`` with the least forecast error on its channels under ``schedule``'s mask.
    Returns per block a (C,) solver index per channel, and a summary."""
    mask = schedule.to_mask()
    row = {n: i for i, n in enumerate(schedule.blocks)}
    assign, total = [], np.zeros(len(pool))
    for name in blocks:
        F = np.asarray(features[name], dtype=np.float64)  # (K, N, T, C)
        traj = F.reshape(F.shape[0], -1, F.shape[-1]).mean(1).T  # (C, K)
        traj = (traj - traj.mean(1, keepdims=True)) / np.maximum(traj.std(1, keepdims=True), 1e-12)
        labels = _kmeans(traj, n_groups, seed)
        errs = np.stack([forecast_errors(F, mask[row[name]], f) for f in pool])  # (n_solvers, C)
        a = np.zeros(F.shape[-1], dtype=np.int64)
        for g in np.unique(labels):
            a[labels == g] = int(errs[:, labels == g].sum(1).argmin())
        assign.append(a)
        total += errs.sum(1)
    return assign, {"solver_error_if_alone": total.tolist()}
