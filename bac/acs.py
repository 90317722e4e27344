"""The Adaptive Caching Scheduler (ACS): where one block should recompute, given how its feature drifts.

Paper: Ji et al., "Block-wise Adaptive Caching for Accelerating Diffusion Policy", ICLR 2026 (arXiv 2506.13456).

A block's feature at denoising step k is the delta its residual branch adds (flattened). From an uncached
calibration run we get the features X_0 .. X_{K-1}, a K x K matrix ``sim`` between them, and choose S update
steps ``0 = c_1 < ... < c_S <= K-1``. The feature computed at c_m stands in for steps c_m .. c_{m+1}-1 (the
last segment runs to K-1), and the steps are the ones that maximize (minimize, for a distance)

    J(c) = sum_{m=1..S} sum_{t=c_m}^{c_{m+1}-1} sim[c_m, t],      c_{S+1} := K,

i.e. the similarity between each cached feature and every feature it replaces (self term included, as in the
authors' code; the papers' summaries write a consecutive-step form that collapses to a top-S pick).
"""
from __future__ import annotations

import numpy as np

METRICS = {"cosine": True, "l1": False, "mse": False}  # True: a similarity to maximize; False: a distance


def _matrix(x: np.ndarray, metric: str) -> np.ndarray:
    """(K, D) -> (K, K) float64."""
    x = x.astype(np.float64, copy=False)
    if metric == "cosine":
        # eps keeps an all-zero feature (a zero-initialised branch) finite instead of NaN
        unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return unit @ unit.T
    # one row at a time: a (K, K, D) difference tensor would be K times larger than the features
    out = np.empty((len(x), len(x)))
    for i in range(len(x)):
        d = x[i] - x  # (K, D)
        out[i] = np.abs(d).mean(axis=1) if metric == "l1" else (d * d).mean(axis=1)
    return out


def similarity_matrix(features: np.ndarray, metric: str) -> np.ndarray:
    """(K, K) float64 matrix of ``metric`` between the features of every pair of steps.

    ``features`` is (K, D), one flattened feature per denoising step, or (K, N, D) for N calibration samples,
    whose per-sample matrices are averaged. cosine: cosine similarity; l1: mean |a - b|; mse: mean (a - b)^2.
    """
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {list(METRICS)}")
    features = np.asarray(features)
    if features.ndim == 2:
        return _matrix(features, metric)
    if features.ndim == 3:
        return np.mean([_matrix(features[:, n], metric) for n in range(features.shape[1])], axis=0)
    raise ValueError(f"features must be (K, D) or (K, N, D) (flatten each step's feature), got {features.shape}")


def _segment_sums(sim: np.ndarray) -> np.ndarray:
    """seg[a, b] = sum_{t=a..b} sim[a, t] for a <= b, -inf below the diagonal. (K, K), O(K^2)."""
    csum = np.cumsum(sim, axis=1)  # (K, K): csum[a, b] = sum_{t<=b} sim[a, t]
    before = np.concatenate([[0.0], csum[np.arange(1, len(sim)), np.arange(len(sim) - 1)]])  # (K,) sum_{t<a}
    seg = csum - before[:, None]
    seg[np.tril_indices(len(sim), k=-1)] = -np.inf
    return seg


def acs_steps(sim: np.ndarray, n_updates: int, maximize: bool = True) -> list[int]:
    """The S = ``n_updates`` update steps (sorted, starting with 0) that optimize J(c) for one block.

    ``sim`` is (K, K); ``maximize`` is ``METRICS[metric]``. Exact dynamic program over (segments used, last
    step covered), O(S K^2) time: f[s, i] = best J of s segments covering steps 0..i, with
    f[1, i] = seg(0, i) and f[s, i] = max_{j < i} f[s-1, j] + seg(j+1, i); the answer is f[S, K-1].
    S >= K returns every step. Ties are broken deterministically (the smallest j in the max).
    """
    sim = np.asarray(sim, dtype=np.float64)
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1] or len(sim) == 0:
        raise ValueError(f"sim must be a non-empty square (K, K) matrix, got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("sim contains NaN or inf")
    if n_updates < 1:
        raise ValueError(f"n_updates must be >= 1 (step 0 is always an update), got {n_updates}")
    K = len(sim)
    if n_updates >= K:
        return list(range(K))

    seg = _segment_sums(sim if maximize else -sim)  # (K, K); maximize -distance == minimize distance
    f = seg[0].copy()  # (K,) f[1, i]
    back = np.zeros((n_updates + 1, K), dtype=np.int64)  # back[s, i] = end j of the first s-1 segments
    for s in range(2, n_updates + 1):
        cand = f[:-1, None] + seg[1:, :]  # (K-1, K): cand[j, i] = f[s-1, j] + seg(j+1, i)
        back[s] = np.argmax(cand, axis=0)
        f = cand[back[s], np.arange(K)]

    steps, i = [], K - 1
    for s in range(n_updates, 1, -1):
        i = int(back[s, i])
        steps.append(i + 1)  # segment s starts right after the first s-1 end
    return [0] + steps[::-1]
