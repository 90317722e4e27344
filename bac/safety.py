"""The last check between a policy and a robot: every action is validated and limited before it is sent.

``ActionLimits`` is what a robot declares: per-dimension bounds, optional rate and jerk limits (per control tick)
and a safe action (for a delta controller, no motion) that is checked once, when the limits are built, so that
sending it cannot fail later. ``SafetyGuard.filter`` refuses an action of the wrong shape or with NaN/inf (the
loop then stops the robot with the safe action), clips it into the bounds and limits its change from the
previously sent action; it counts what fired, for the run's summary.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class UnsafeAction(RuntimeError):
    """An action that must not reach the robot (wrong shape, NaN or inf)."""


def _vector(value, dim: int, name: str) -> np.ndarray | None:
    if value is None:
        return None
    v = np.broadcast_to(np.asarray(value, dtype=np.float64), (dim,)).copy()
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} must be finite, got {v.tolist()}")
    return v


@dataclass
class ActionLimits:
    """Bounds (Da,), optional ``max_rate`` (largest change per tick) and ``max_jerk`` (largest change of that
    change) per dimension, scalars broadcast; ``safe_action`` (Da,) is what the robot gets when it must stop."""

    low: np.ndarray
    high: np.ndarray
    safe_action: np.ndarray
    max_rate: np.ndarray | None = None
    max_jerk: np.ndarray | None = None

    def __post_init__(self):
        low = np.asarray(self.low, dtype=np.float64).reshape(-1)
        dim = low.shape[0]
        self.low, self.high = _vector(low, dim, "low"), _vector(self.high, dim, "high")
        if np.any(self.low > self.high):
            raise ValueError(f"low {self.low.tolist()} exceeds high {self.high.tolist()}")
        safe = np.asarray(self.safe_action, dtype=np.float64)
        if safe.shape != (dim,) or not np.all(np.isfinite(safe)) or np.any(safe < self.low) or np.any(safe > self.high):
            raise ValueError(f"the safe action must be a finite ({dim},) vector within the bounds, got {safe.tolist()}")
        self.safe_action = safe
        self.max_rate = _vector(self.max_rate, dim, "max_rate")
        self.max_jerk = _vector(self.max_jerk, dim, "max_jerk")
        for name, v in (("max_rate", self.max_rate), ("max_jerk", self.max_jerk)):
            if v is not None and np.any(v <= 0):
                raise ValueError(f"{name} must be positive, got {v.tolist()}")

    @property
    def dim(self) -> int:
        return self.low.shape[0]


@dataclass
class SafetyGuard:
    """Filters every action on its way to the robot; ``counts`` says how often each guard fired."""

    limits: ActionLimits
    counts: dict = field(default_factory=lambda: {"checked": 0, "bounds_clipped": 0, "rate_limited": 0,
                                                 "jerk_limited": 0, "refused": 0, "safe_actions_sent": 0})
    _sent: list = field(default_factory=list)  # the last two actions sent (float64)

    def filter(self, action) -> np.ndarray:
        """The action to send: checked, clipped and limited; raises ``UnsafeAction`` for a wrong shape or NaN/inf."""
        lim = self.limits
        a = np.asarray(action, dtype=np.float64)
        self.counts["checked"] += 1
        if a.shape != (lim.dim,):
            self.counts["refused"] += 1
            raise UnsafeAction(f"action of shape {a.shape}; the robot takes ({lim.dim},)")
        if not np.all(np.isfinite(a)):
            self.counts["refused"] += 1
            raise UnsafeAction(f"action holds NaN or inf: {a.tolist()}")
        out = np.clip(a, lim.low, lim.high)
        self.counts["bounds_clipped"] += int(not np.array_equal(out, a))
        if lim.max_rate is not None and self._sent:
            prev = self._sent[-1]
            limited = np.clip(out, prev - lim.max_rate, prev + lim.max_rate)
            self.counts["rate_limited"] += int(not np.array_equal(limited, out))
            out = limited
        if lim.max_jerk is not None and len(self._sent) == 2:
            prev, prev2 = self._sent[-1], self._sent[-2]
            rate = np.clip(out - prev, (prev - prev2) - lim.max_jerk, (prev - prev2) + lim.max_jerk)
            limited = np.clip(prev + rate, lim.low, lim.high)
            self.counts["jerk_limited"] += int(not np.array_equal(limited, out))
            out = limited
        self._sent = (self._sent + [out])[-2:]
        return out.astype(np.float32)

    def safe(self) -> np.ndarray:
        """The declared safe action (always sendable: checked when the limits were built)."""
        self.counts["safe_actions_sent"] += 1
        self._sent = (self._sent + [self.limits.safe_action])[-2:]
        return self.limits.safe_action.astype(np.float32)

    @property
    def last_sent(self) -> np.ndarray | None:
        return None if not self._sent else self._sent[-1].astype(np.float32)
