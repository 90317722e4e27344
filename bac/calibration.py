"""Calibration results: per-block similarity matrices across denoising steps, saved once per checkpoint.

Calibration runs the uncached model on a few observations and records every block's output (its residual
delta) at every step. What the schedulers need from those features is small: a (K, K) matrix per block
and metric, and one drift score per block for the Bubbling Union. Keeping only that (a few MB instead of
the raw features) lets a fresh clone build a schedule for any S, n and metric without the demos.

``calibrate(target, n)`` makes one from any model that implements ``bac.protocol.CacheTarget``. The features
of a run are streamed into those sums: when all of them fit ``max_bytes`` (a robot policy: K x N x D is a few
MB per block) they are kept for the run and reduced at its end; otherwise (video latents) the same seeded run is
repeated, each time keeping only a window of steps and adding its pairs with every later step, so memory stays
within the budget whatever K, N and D are.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import torch

from bac.acs import METRICS, similarity_matrix
from bac.blocks import BlockInfo
from bac.bubbling import block_errors
from bac.schedule import Schedule, from_similarity


@dataclass
class Calibration:
    blocks: list[BlockInfo]
    num_steps: int  # K
    sims: dict[str, np.ndarray]  # metric -> (n_blocks, K, K)
    errors: np.ndarray  # (n_blocks,) mean pairwise L1 of each block's features across steps
    scheduler: str = ""
    model_hash: str = ""
    source: dict = field(default_factory=dict)  # where the observations came from, how many, seed

    @classmethod
    def from_features(cls, features: dict[str, np.ndarray], blocks: list[BlockInfo], **meta) -> "Calibration":
        """features[name]: (K, N, D), block ``name``'s flattened output at each step for N observations."""
        names = [b.name for b in blocks]
        K = len(features[names[0]])
        sims = {m: np.stack([similarity_matrix(features[n], m) for n in names]).astype(np.float32) for m in METRICS}
        errs = block_errors({n: features[n] for n in names})
        return cls(blocks, K, sims, np.array([errs[n] for n in names], np.float64), **meta)

    def schedule(self, method: str, n_updates: int, n_bubble: int = 0, metric: str = "cosine",
                 step_weights: np.ndarray | None = None) -> Schedule:
        """Build a schedule of any method from this calibration (see ``bac.schedule.from_similarity``).
        ``step_weights`` (K,): output-weighted ACS (``bac.sensitivity``), each replaced step t's similarity
        (or distance) scaled by w_t."""
        if metric not in self.sims:
            raise ValueError(f"calibration has no {metric!r} matrices; it has {sorted(self.sims)}")
        names = [b.name for b in self.blocks]
        sims = {n: self.sims[metric][i].astype(np.float64) for i, n in enumerate(names)}
        source = dict(self.source)
        if step_weights is not None:
            w = np.asarray(step_weights, np.float64)
            if w.shape != (self.num_steps,) or not np.isfinite(w).all() or (w < 0).any():
                raise ValueError(f"step_weights must be {self.num_steps} finite non-negative numbers, got shape {w.shape}")
            sims = {n: m * w[None, :] for n, m in sims.items()}
            source["step_weights"] = [round(float(x), 4) for x in w]
        errors = {n: float(e) for n, e in zip(names, self.errors)}
        return from_similarity(
            sims, errors, self.blocks, method, n_updates, n_bubble, metric,
            scheduler=self.scheduler, model_hash=self.model_hash, calibration=source,
        )

    def save(self, path: str | Path) -> None:
        meta = {
            "blocks": [[b.name, b.layer, b.kind] for b in self.blocks],
            "num_steps": self.num_steps, "scheduler": self.scheduler, "model_hash": self.model_hash,
            "source": self.source,
        }
        arrays = {f"sim_{m}": v for m, v in self.sims.items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), errors=self.errors, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "Calibration":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"calibration file {path} is missing; make it with `python eval/calibrate.py ...`")
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            sims = {k[len("sim_"):]: z[k] for k in z.files if k.startswith("sim_")}
            errors = z["errors"]
        blocks = [BlockInfo(n, layer, kind) for n, layer, kind in meta["blocks"]]
        return cls(blocks, meta["num_steps"], sims, errors, meta["scheduler"], meta["model_hash"], meta["source"])


class _Stream:
    """The engine's recording sink: block ``name``'s j-th value is its feature at step j, (N, D) float64 rows.

    Keeps the steps in ``[lo, hi)``; every later step adds its pairs with them to per-block sums of each metric."""

    def __init__(self, names: list[str], K: int, lo: int, hi: int, keep_all: bool):
        self.K, self.lo, self.hi, self.keep_all = K, lo, hi, keep_all
        self.count = dict.fromkeys(names, 0)
        self.kept: dict[str, dict[int, np.ndarray]] = {n: {} for n in names}
        self.sums = {m: {n: np.zeros((K, K)) for n in names} for m in METRICS}

    def __contains__(self, key) -> bool:
        return key in self.count

    def __getitem__(self, name: str) -> "_Stream._Rows":
        return _Stream._Rows(self, name)

    class _Rows:
        def __init__(self, stream: "_Stream", name: str):
            self.stream, self.name = stream, name

        def append(self, value: torch.Tensor) -> None:
            self.stream.add(self.name, value.reshape(value.shape[0], -1).numpy())

    def add(self, name: str, x: np.ndarray) -> None:
        k = self.count[name]
        self.count[name] = k + 1
        if k >= self.K:
            raise RuntimeError(f"block {name} ran more than K={self.K} times in one calibration run (several model "
                               "calls per step?); calibrate one call per step")
        kept = self.kept[name]
        if self.keep_all:
            kept[k] = x
            return
        if self.lo <= k < self.hi:
            kept[k] = x
        xk = x.astype(np.float64)
        uk = xk / np.maximum(np.linalg.norm(xk, axis=1, keepdims=True), 1e-12)
        for i, xi in kept.items():  # pairs (i, k), i in the window, i <= k: each pair once over all passes
            if i > k:
                continue
            xi = xi.astype(np.float64)
            ui = xi / np.maximum(np.linalg.norm(xi, axis=1, keepdims=True), 1e-12)
            d = xi - xk
            vals = {"cosine": (ui * uk).sum(1).mean(), "l1": np.abs(d).mean(1).mean(), "mse": (d * d).mean(1).mean()}
            for m, v in vals.items():
                self.sums[m][name][i, k] = self.sums[m][name][k, i] = v


def calibrate(target, n: int, seed: int = 0, max_bytes: int = 2**30, **meta) -> Calibration:
    """The calibration of ``target`` (a ``bac.protocol.CacheTarget``) from its uncached run over ``n`` inputs,
    streamed (see the module docstring); ``meta`` (e.g. ``source``) is recorded with it."""
    from bac.protocol import attach_to

    sig = target.cache_signature()
    K = sig.num_steps
    engine = attach_to(target)
    try:
        with engine.recording() as probe:  # the first call shows the order and each block's feature size
            names = [b.name for b in engine.trace(target.cache_call())]
        if any(not v for v in probe.values()):
            raise RuntimeError("the engine had already run this model; calibrate with a fresh engine")
        per_input = sum(v[0][0].numel() for v in probe.values()) * 4  # float32 bytes of one step, one input
        window = max(1, min(K, max_bytes // max(per_input * n, 1)))
        passes = -(-K // window)
        streams = []
        for p in range(passes):
            stream = _Stream(names, K, p * window, min(K, (p + 1) * window), keep_all=passes == 1)
            with engine.recording(into=stream):
                target.cache_sample(engine, n, seed)
            short = [name for name, c in stream.count.items() if c != K]
            if short:
                raise RuntimeError(f"blocks {short} did not run at each of the K={K} steps of the calibration run")
            streams.append(stream)
        blocks = list(engine.blocks)
    finally:
        engine.detach()
    meta = {"scheduler": sig.scheduler, "model_hash": sig.model_hash, **meta}
    if passes == 1:  # everything was kept: the same arithmetic as from_features
        kept = streams[0].kept
        return Calibration.from_features({name: np.stack([kept[name][k] for k in range(K)]) for name in names},
                                         blocks, **meta)
    sims = {m: np.stack([sum(s.sums[m][name] for s in streams) for name in names]).astype(np.float32) for m in METRICS}
    upper = np.triu_indices(K, k=1)
    l1 = [sum(s.sums["l1"][name] for s in streams) for name in names]
    errors = np.array([float(x[upper].mean()) if K > 1 else 0.0 for x in l1], np.float64)
    return Calibration(blocks, K, sims, errors, **meta)
