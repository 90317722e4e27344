"""Static masks with a forecaster on the skipped steps (``bac.strategies.MaskForecast``, ``bac.forecasters``).

  taylorseer    TaylorSeer (arXiv 2503.06923): interval mask, Taylor expansion of the computed outputs
  foca          FoCa (arXiv 2508.16211): interval mask, BDF2 predictor + Heun corrector
  abcache       AB-Cache (arXiv 2504.10540): interval mask, Adams-Bashforth
  hyca          HyCa (arXiv 2510.04188): interval mask, a solver per channel group fitted on a recorded run
  ertacache     ERTACache (arXiv 2508.21091): profiled whole-step mask, fitted linear residual correction
  bac_forecast  BAC's calibrated per-block mask with a forecaster instead of plain reuse
"""
from __future__ import annotations

from dataclasses import dataclass, field

from bac import profiling
from bac.forecasters import FORECASTERS, HyCa, LinearCorrection, make_forecaster
from bac.methods.context import CacheContext
from bac.methods.rows import BACConfig, build_row
from bac.methods.static import FORAConfig, _positive
from bac.strategies import MaskForecast


@dataclass
class TaylorSeerConfig(FORAConfig):
    order: int = 1  # diffusers recommends 1; the paper uses up to 4

    def __post_init__(self):
        super().__post_init__()
        self.order = _positive("order", self.order)


@dataclass
class FoCaConfig(FORAConfig):
    pass


@dataclass
class ABCacheConfig(FORAConfig):
    order: int = 2

    def __post_init__(self):
        super().__post_init__()
        self.order = _positive("order", self.order)


@dataclass
class HyCaConfig(FORAConfig):
    n_groups: int = 8  # channel groups per block
    n_obs: int = 8  # calibration inputs of the offline fit
    pool: list = field(default_factory=lambda: [{"name": "reuse"}, {"name": "taylor", "order": 1},
                                                {"name": "taylor", "order": 2},
                                                {"name": "adams_bashforth", "order": 2}, {"name": "foca"}])

    def __post_init__(self):
        super().__post_init__()
        self.n_groups, self.n_obs = _positive("n_groups", self.n_groups), _positive("n_obs", self.n_obs)
        bad = [p for p in self.pool if p.get("name") not in FORECASTERS]
        if not self.pool or bad:
            raise ValueError(f"cache.pool needs forecasters named from {sorted(FORECASTERS)}; got {list(self.pool)}")


@dataclass
class ERTACacheConfig:
    n_updates: int = 33  # computed steps out of K
    n_obs: int = 8

    def __post_init__(self):
        self.n_updates, self.n_obs = _positive("n_updates", self.n_updates), _positive("n_obs", self.n_obs)


@dataclass
class BACForecastConfig:
    n_updates: int | None = 10  # S
    n_bubble: int = 5  # n
    metric: str = "cosine"
    forecaster: str = "taylor"  # taylor | foca | adams_bashforth | reuse (reuse = bac)
    order: int = 1

    def __post_init__(self):
        if self.n_updates is None:
            raise ValueError("cache 'bac_forecast' needs the knob cache.n_updates")
        BACConfig(self.n_updates, self.n_bubble, self.metric)  # the mask's knobs, checked as bac checks them
        if self.forecaster not in FORECASTERS:
            raise ValueError(f"cache.forecaster={self.forecaster!r} is not one of {sorted(FORECASTERS)}")
        self.order = _positive("order", self.order)


def _interval(name: str, cfg: FORAConfig, ctx: CacheContext):
    return profiling.interval_schedule(ctx.names, ctx.K, cfg.interval, cfg.warmup, method=name, **ctx.meta)


def _interval_forecast(name: str, forecaster: str):
    def build(cfg, ctx):
        return MaskForecast(_interval(name, cfg, ctx), make_forecaster(forecaster, getattr(cfg, "order", 1)), name=name)

    return build


def build_hyca(cfg: HyCaConfig, ctx: CacheContext):
    pool = [make_forecaster(p["name"], int(p.get("order", 1))) for p in cfg.pool]
    mask = _interval("hyca", cfg, ctx)
    traj = ctx.trajectory(cfg.n_obs)
    assign, fit = profiling.fit_hyca(traj.features, mask, pool, ctx.names, cfg.n_groups)
    strategy = MaskForecast(mask, HyCa(pool, assign), name="hyca")
    strategy.fit = fit
    return strategy


def build_erta(cfg: ERTACacheConfig, ctx: CacheContext):
    traj = ctx.trajectory(cfg.n_obs)
    mask = profiling.erta_schedule(ctx.names, traj.features, cfg.n_updates, **ctx.meta)
    return MaskForecast(mask, LinearCorrection(profiling.fit_erta(mask, traj.features, ctx.names)), name="ertacache")


def build_bac_forecast(cfg: BACForecastConfig, ctx: CacheContext):
    mask = build_row("bac", BACConfig(cfg.n_updates, cfg.n_bubble, cfg.metric), ctx)
    return MaskForecast(mask, make_forecaster(cfg.forecaster, cfg.order), name="bac_forecast")


METHODS = [
    ("ertacache", ERTACacheConfig, build_erta, "profiled whole-step mask + linear correction (ERTACache)"),
    ("taylorseer", TaylorSeerConfig, _interval_forecast("taylorseer", "taylor"), "interval + Taylor forecast"),
    ("foca", FoCaConfig, _interval_forecast("foca", "foca"), "interval + BDF2/Heun forecast (FoCa)"),
    ("abcache", ABCacheConfig, _interval_forecast("abcache", "adams_bashforth"), "interval + Adams-Bashforth"),
    ("hyca", HyCaConfig, build_hyca, "interval + per-channel-group solvers (HyCa)"),
    ("bac_forecast", BACForecastConfig, build_bac_forecast, "BAC's mask + a forecaster"),
]
