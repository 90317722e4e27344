"""The literature's static masks with plain residual reuse (``bac.profiling`` builds them).

  fora       FORA (arXiv 2407.01425): every block recomputes every ``interval`` steps after ``warmup``
  delta_dit  Δ-DiT (arXiv 2406.01125): the rear layers cached before the boundary step, the front ones after
  profiling  ProfilingDiT (arXiv 2504.03140): the ``n_always`` most drifting blocks always compute
"""
from __future__ import annotations

from dataclasses import dataclass

from bac import profiling
from bac.methods.context import CacheContext


def _positive(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or value is None or int(value) != value or int(value) < minimum:
        raise ValueError(f"cache.{name}={value!r} must be an integer >= {minimum}")
    return int(value)


@dataclass
class FORAConfig:
    interval: int = 3  # N: full step every N steps
    warmup: int = 1  # steps computed in full before the interval starts

    def __post_init__(self):
        self.interval, self.warmup = _positive("interval", self.interval), _positive("warmup", self.warmup)


@dataclass
class DeltaDiTConfig:
    interval: int = 10  # a cached span computes every ``interval`` steps
    n_cached_layers: int | None = 6  # span length in layers
    boundary: float = 0.5  # boundary step as a fraction of K

    def __post_init__(self):
        self.interval = _positive("interval", self.interval)
        if self.n_cached_layers is None:
            raise ValueError("cache 'delta_dit' needs the knob cache.n_cached_layers")
        self.n_cached_layers = _positive("n_cached_layers", self.n_cached_layers, 0)
        if not 0.0 <= float(self.boundary) <= 1.0:
            raise ValueError(f"cache.boundary={self.boundary!r} must be in [0, 1]")


@dataclass
class ProfilingConfig:
    n_always: int | None = 3  # blocks that always compute
    interval: int = 5
    warmup: int = 5

    def __post_init__(self):
        if self.n_always is None:
            raise ValueError("cache 'profiling' needs the knob cache.n_always")
        self.n_always = _positive("n_always", self.n_always, 0)
        self.interval, self.warmup = _positive("interval", self.interval), _positive("warmup", self.warmup)


def build_fora(cfg: FORAConfig, ctx: CacheContext):
    return profiling.interval_schedule(ctx.names, ctx.K, cfg.interval, cfg.warmup, method="fora", **ctx.meta)


def build_delta_dit(cfg: DeltaDiTConfig, ctx: CacheContext):
    return profiling.delta_dit_schedule(ctx.blocks, ctx.K, cfg.interval, cfg.n_cached_layers, float(cfg.boundary),
                                        **ctx.meta)


def build_profiling(cfg: ProfilingConfig, ctx: CacheContext):
    calib = ctx.calibration()
    errors = dict(zip([b.name for b in calib.blocks], calib.errors))
    return profiling.profiling_schedule(ctx.blocks, [errors[n] for n in ctx.names], ctx.K, cfg.n_always, cfg.interval,
                                        cfg.warmup, calibration={"source": "block drift"}, **ctx.meta)


METHODS = [
    ("fora", FORAConfig, build_fora, "static interval (FORA)"),
    ("delta_dit", DeltaDiTConfig, build_delta_dit, "front/rear layer spans by stage (Δ-DiT)"),
    ("profiling", ProfilingConfig, build_profiling, "most drifting blocks always compute (ProfilingDiT)"),
]
