"""Calibration results: per-block similarity matrices across denoising steps, saved once per checkpoint.

Calibration runs the uncached model on a few observations and records every block's output (its residual
delta) at every step. What the schedulers need from those features is small: a (K, K) matrix per block
and metric, and one drift score per block for the Bubbling Union. Keeping only that (a few MB instead of
the raw features) lets a fresh clone build a schedule for any S, n and metric without the demos.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

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

    def schedule(self, method: str, n_updates: int, n_bubble: int = 0, metric: str = "cosine") -> Schedule:
        """Build a schedule of any method from this calibration (see ``bac.schedule.from_similarity``)."""
        if metric not in self.sims:
            raise ValueError(f"calibration has no {metric!r} matrices; it has {sorted(self.sims)}")
        names = [b.name for b in self.blocks]
        sims = {n: self.sims[metric][i].astype(np.float64) for i, n in enumerate(names)}
        errors = {n: float(e) for n, e in zip(names, self.errors)}
        return from_similarity(
            sims, errors, self.blocks, method, n_updates, n_bubble, metric,
            scheduler=self.scheduler, model_hash=self.model_hash, calibration=dict(self.source),
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
