"""Online triggers: a per-step indicator against a threshold decides what reuses (``bac.strategies``).

  teacache  TeaCache (CVPR 2025): whole steps skipped while the rescaled input change accumulates below ``delta``;
            the rescaling polynomial is fitted on a recorded run over ``n_obs`` calibration inputs
  fbcache   First Block Cache: the first layer runs; its residual's change decides whether the rest reuses
  bwcache   BWCache (arXiv 2509.13789): per layer, reuse while its input changed little, at most ``max_reuse``
"""
from __future__ import annotations

from dataclasses import dataclass

from bac import profiling
from bac.methods.context import CacheContext
from bac.methods.static import _positive
from bac.strategies import BWCache, FBCache, TeaCache


def _number(name: str, value) -> float:
    if value is None or isinstance(value, bool):
        raise ValueError(f"cache.{name}={value!r} must be a number (<= 0 computes every step)")
    return float(value)


@dataclass
class TeaCacheConfig:
    delta: float = 0.8  # <= 0 computes every step
    n_obs: int = 8  # calibration inputs of the fit

    def __post_init__(self):
        self.delta, self.n_obs = _number("delta", self.delta), _positive("n_obs", self.n_obs)


@dataclass
class FBCacheConfig:
    threshold: float = 1.0  # <= 0 computes every step

    def __post_init__(self):
        self.threshold = _number("threshold", self.threshold)


@dataclass
class BWCacheConfig:
    threshold: float = 0.8  # <= 0 computes every step
    max_reuse: int = 5

    def __post_init__(self):
        self.threshold, self.max_reuse = _number("threshold", self.threshold), _positive("max_reuse", self.max_reuse, 0)


def build_teacache(cfg: TeaCacheConfig, ctx: CacheContext):
    traj = ctx.trajectory(cfg.n_obs)
    fit = profiling.fit_teacache(traj.first_input, traj.features)
    strategy = TeaCache(cfg.delta, fit["coeffs"])
    strategy.fit = fit
    return strategy


METHODS = [
    ("teacache", TeaCacheConfig, build_teacache, "whole-step skip on the rescaled input change (TeaCache)"),
    ("fbcache", FBCacheConfig, lambda cfg, ctx: FBCache(cfg.threshold), "first layer decides (First Block Cache)"),
    ("bwcache", BWCacheConfig, lambda cfg, ctx: BWCache(cfg.threshold, cfg.max_reuse), "per-layer input change (BWCache)"),
]
