"""BAC's ablation rows (Ji et al., ICLR 2026): static per-block masks with plain residual reuse.

  none           no engine: every block, every step
  uniform        all blocks at 0, i, 2i, ... with i = max(1, K // S)
  unified_acs    one ACS schedule (on the mean similarity) for all blocks, plus K-1
  blockwise_acs  ACS per block, plus K-1
  bac            ACS per block, then the Bubbling Union over the n most drifting blocks
With ``weights=output`` the calibrated rows weight each step by how much its reuse moves the final output per
unit of feature drift (``bac.sensitivity``), instead of counting every step alike.

The calibrated rows read the target's calibration (``bac.calibration``); ``schedule`` runs a saved schedule
JSON instead, checked against the model, sampler and K.
"""
from __future__ import annotations

from dataclasses import dataclass

from bac.acs import METRICS
from bac.methods.context import CacheContext
from bac.schedule import Schedule, uniform

WEIGHTS = ("none", "output")


@dataclass
class RowConfig:
    n_updates: int | None = 10  # S: update steps per block
    n_bubble: int = 5  # n: Bubbling Union blocks (bac only)
    metric: str = "cosine"  # ACS metric (calibrated rows)
    schedule: str | None = None  # a schedule JSON to run instead of building one
    weights: str = "none"  # ACS step weights (calibrated rows): none (the paper's) | output (bac.sensitivity)

    def __post_init__(self):
        if self.weights not in WEIGHTS:
            raise ValueError(f"cache.weights={self.weights!r} is not one of {list(WEIGHTS)}")
        if self.metric not in METRICS:
            raise ValueError(f"cache.metric={self.metric!r} is not one of {list(METRICS)}")
        self.n_bubble = int(self.n_bubble or 0)
        if self.n_bubble < 0:
            raise ValueError(f"cache.n_bubble={self.n_bubble} must be >= 0")


@dataclass
class BACConfig(RowConfig):
    n_bubble: int = 1  # 1, not the authors' 5: as good or better on the shipped checkpoints, and faster


def build_row(method: str, cfg: RowConfig, ctx: CacheContext) -> Schedule | None:
    """The schedule of row ``method`` (None for ``none``), checked against the target."""
    if method == "none":
        return None
    K = ctx.K
    n_updates = cfg.n_updates if isinstance(cfg.n_updates, int) else int(cfg.n_updates or -1)
    if cfg.schedule:
        schedule = Schedule.load(cfg.schedule)
        if schedule.method != method:  # a BAC schedule run as cache=uniform would be labelled uniform
            raise ValueError(f"cache.schedule={cfg.schedule} holds a {schedule.method!r} schedule, but cache={method}; "
                             f"run it as cache={schedule.method}")
    elif not (isinstance(n_updates, int) and 1 <= n_updates <= K):
        raise ValueError(f"cache.n_updates={n_updates!r} must be an integer in [1, K={K}] (update steps per block "
                         f"out of the sampler's {K})")
    elif method == "uniform":
        schedule = uniform(ctx.names, K, n_updates, **ctx.meta)
    else:
        weights = ctx.step_weights() if cfg.weights == "output" else None
        schedule = ctx.calibration().schedule(method, n_updates, cfg.n_bubble, cfg.metric, step_weights=weights)
    ctx.signature.check(schedule)
    return schedule


def _row(method):
    return lambda cfg, ctx: build_row(method, cfg, ctx)


@dataclass
class NoneConfig(RowConfig):
    """``none`` takes the rows' knobs, so that a sweep over the rows can pass them, and ignores them."""


METHODS = [
    ("none", NoneConfig, _row("none"), "no cache"),
    ("uniform", RowConfig, _row("uniform"), "all blocks every floor(K/S) steps"),
    ("unified_acs", RowConfig, _row("unified_acs"), "one ACS schedule for all blocks"),
    ("blockwise_acs", RowConfig, _row("blockwise_acs"), "ACS per block"),
    ("bac", BACConfig, _row("bac"), "ACS per block + Bubbling Union"),
]
