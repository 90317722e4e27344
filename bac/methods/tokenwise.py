"""Token-wise caching: on cached steps, token-wise blocks recompute only the tokens that changed most.

  toca  ToCa (arXiv 2410.05317): full steps every ``interval``; in between the FFN blocks recompute ``ratio`` of
        their tokens, scored by input change and cache age (``bac.strategies.ToCa``)
"""
from __future__ import annotations

from dataclasses import dataclass

from bac.methods.static import _positive
from bac.strategies import ToCa


@dataclass
class ToCaConfig:
    interval: int = 5
    ratio: float = 0.3  # share of an FFN's tokens recomputed on a cached step
    freq_weight: float = 0.25  # score bonus per step a token's output has been cached, over the interval

    def __post_init__(self):
        self.interval = _positive("interval", self.interval)
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise ValueError(f"cache.ratio={self.ratio!r} must be in [0, 1]")
        self.ratio, self.freq_weight = float(self.ratio), float(self.freq_weight)


METHODS = [
    ("toca", ToCaConfig, lambda cfg, ctx: ToCa(cfg.interval, cfg.ratio, cfg.freq_weight), "token-wise FFN recompute (ToCa)"),
]
