"""Per-dimension min-max normalization to [-1, 1], fitted on a dataset (Diffusion Policy's "limits" mode)."""
from __future__ import annotations

import numpy as np
import torch

MIN_RANGE = 1e-4  # dimensions that barely move in the data are centred, not stretched


class Normalizer:
    """Holds ``scale`` and ``offset`` per named field; ``normalize(x) = x * scale + offset``."""

    def __init__(self, stats: dict[str, dict[str, list[float]]]):
        self.stats = {k: {"min": list(map(float, v["min"])), "max": list(map(float, v["max"]))} for k, v in stats.items()}
        self._params: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, s in self.stats.items():
            lo, hi = np.asarray(s["min"], np.float64), np.asarray(s["max"], np.float64)
            rng = hi - lo
            flat = rng < MIN_RANGE
            scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, rng))
            offset = np.where(flat, -(hi + lo) / 2, -1.0 - scale * lo)
            self._params[key] = (torch.tensor(scale, dtype=torch.float32), torch.tensor(offset, dtype=torch.float32))

    @classmethod
    def fit(cls, data: dict[str, np.ndarray]) -> "Normalizer":
        """``data[key]`` is (N, D); the limits are taken over N."""
        stats = {}
        for key, x in data.items():
            x = np.asarray(x).reshape(-1, np.asarray(x).shape[-1])
            if not np.all(np.isfinite(x)):
                raise ValueError(f"cannot fit a normalizer on {key!r}: the data holds NaN or inf")
            stats[key] = {"min": x.min(0).tolist(), "max": x.max(0).tolist()}
        return cls(stats)

    def _get(self, key: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if key not in self._params:
            raise KeyError(f"normalizer has no statistics for {key!r}; it has {sorted(self._params)}")
        scale, offset = self._params[key]
        if x.shape[-1] != scale.shape[0]:
            raise ValueError(f"{key!r} has last dimension {x.shape[-1]}, the normalizer was fitted on {scale.shape[0]}")
        return scale.to(x.device, x.dtype), offset.to(x.device, x.dtype)

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._get(key, x)
        return x * scale + offset

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self._get(key, x)
        return (x - offset) / scale

    def to_dict(self) -> dict:
        return self.stats
