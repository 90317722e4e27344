"""One control stream's state and its tick: observation history, a timestamped action queue, the inference in flight.

Both drivers (``bac.loop.simulate`` on a simulated clock, ``bac.wallclock.run_wallclock`` on the wall clock) run
the same tick on a ``Stream``: ``poll`` (queue a chunk that has arrived, decide whether to ask for the next),
``start`` (an inference from this tick's observation), ``act`` (the queued action, or the miss policy's). They
differ only in where the time comes from and how the inference runs. The semantics of time, staleness, misses,
asynchronous requests and ensembling are in ``bac.loop``'s docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from bac.rollout import ObsHistory

MODES = ("offline", "realtime")
MISS_POLICIES = ("hold", "repeat")


@dataclass
class LoopConfig:
    """How the loop treats time. See the module docstring for the semantics of each field."""

    mode: str = "offline"
    control_hz: float = 20.0
    asynchronous: bool = True
    on_miss: str = "hold"
    drop_stale: bool = True
    ensemble: float | None = None
    prefetch_margin: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"loop mode must be one of {MODES}, got {self.mode!r}")
        if self.on_miss not in MISS_POLICIES:
            raise ValueError(f"loop on_miss must be one of {MISS_POLICIES}, got {self.on_miss!r}")
        if not self.control_hz > 0:
            raise ValueError(f"control_hz must be positive, got {self.control_hz}")
        if self.ensemble is not None and self.ensemble < 0:
            raise ValueError(f"ensemble weight k must be >= 0 (or None for off), got {self.ensemble}")
        if self.prefetch_margin < 0:
            raise ValueError(f"prefetch_margin must be >= 0, got {self.prefetch_margin}")

    @property
    def dt(self) -> float:
        return 1.0 / self.control_hz


class LatencyModel:
    """Inference latencies for the simulated clock: draws from measured samples, or a fixed value; times ``scale``.

    ``scale`` emulates a slower (> 1) or faster (< 1) device than the one the samples were measured on.
    """

    def __init__(self, samples_s: Sequence[float] | None = None, fixed_s: float | None = None, scale: float = 1.0,
                 seed: int = 0):
        if (samples_s is None) == (fixed_s is None):
            raise ValueError("give a LatencyModel either measured samples_s or a fixed_s latency, not both or neither")
        if samples_s is not None and len(samples_s) == 0:
            raise ValueError("LatencyModel got an empty list of latency samples")
        if fixed_s is not None and fixed_s < 0:
            raise ValueError(f"fixed latency must be >= 0 s, got {fixed_s}")
        if not scale >= 0:
            raise ValueError(f"latency scale must be >= 0, got {scale}")
        self.samples = None if samples_s is None else np.asarray(samples_s, dtype=np.float64)
        self.fixed = fixed_s
        self.scale = float(scale)
        self.rng = np.random.default_rng(seed)

    def draw(self) -> float:
        base = self.fixed if self.samples is None else float(self.rng.choice(self.samples))
        return base * self.scale

    def p95(self) -> float:
        base = self.fixed if self.samples is None else float(np.percentile(self.samples, 95))
        return base * self.scale


class ActionQueue:
    """Timestamped actions of one stream: tick -> the predictions for that tick, oldest first."""

    def __init__(self, drop_stale: bool = True, ensemble: float | None = None):
        self.drop_stale = drop_stale
        self.ensemble = ensemble
        self._slots: dict[int, list[tuple[np.ndarray, int]]] = {}

    def clear(self) -> None:
        self._slots.clear()

    def add_chunk(self, actions: np.ndarray, obs_tick: int, now_tick: int) -> tuple[int, int]:
        """Queue a chunk computed from the observation at ``obs_tick``, arriving at ``now_tick``.

        Returns (how many of its actions were dropped as stale, the tick its first action was queued for).
        """
        actions = np.asarray(actions)
        if actions.ndim != 2:
            raise ValueError(f"a chunk must be (Ta, Da), got shape {actions.shape}")
        shift = 0 if self.drop_stale else max(0, now_tick - obs_tick)  # keep executing: start the chunk now
        dropped = 0
        for k, a in enumerate(actions):
            tick = obs_tick + shift + k
            if tick < now_tick:
                dropped += 1
                continue
            slot = self._slots.setdefault(tick, [])
            if self.ensemble is None:
                slot.clear()  # the newer chunk replaces what was queued for this tick
            slot.append((a, obs_tick))
        return dropped, obs_tick + shift

    def pop(self, tick: int) -> tuple[np.ndarray, float] | None:
        """The action for ``tick`` and the tick of the observation it came from (a weighted mean when
        ensembling); forgets everything before and at ``tick``. None when nothing is queued for it."""
        slot = self._slots.pop(tick, None)
        for t in [t for t in self._slots if t < tick]:
            del self._slots[t]
        if not slot:
            return None
        if self.ensemble is None or len(slot) == 1:
            a, obs_tick = slot[-1]
            return np.asarray(a), float(obs_tick)
        w = np.exp(-self.ensemble * np.arange(len(slot)))
        w /= w.sum()
        action = sum(wi * np.asarray(a, dtype=np.float64) for wi, (a, _) in zip(w, slot))
        return action.astype(np.asarray(slot[0][0]).dtype), float(sum(wi * ot for wi, (_, ot) in zip(w, slot)))


@dataclass
class LoopStats:
    """What one stream's loop did; ``to_json`` goes into each episode's JSONL line."""

    n_inferences: int = 0
    deadline_misses: int = 0
    stale_dropped: int = 0
    executed: int = 0  # policy actions sent (misses excluded)
    age_sum_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "n_inferences": self.n_inferences,
            "deadline_misses": self.deadline_misses,
            "stale_dropped": self.stale_dropped,
            "executed_actions": self.executed,
            "action_age_ms": round(1e3 * self.age_sum_s / self.executed, 2) if self.executed else None,
            "latencies_ms": [round(1e3 * x, 2) for x in self.latencies_s],
        }


class Stream:
    """One control stream: history, queue, the inference in flight, the last action, the stats."""

    def __init__(self, config: LoopConfig, n_obs_steps: int, n_action_steps: int,
                 hold_action: Callable[[np.ndarray | None], np.ndarray] | None = None):
        self.config = config
        self.n_action_steps = n_action_steps
        self.history = ObsHistory(n_obs_steps)
        self.queue = ActionQueue(config.drop_stale, config.ensemble)
        self.hold_action = hold_action
        self.inflight: tuple[int, float, np.ndarray | None] | None = None  # (obs tick, ready time s, chunk)
        self.plan_end = 0  # the latest chunk is executed up to (not including) this tick before replanning
        self.last_action: np.ndarray | None = None
        self.consecutive_misses = 0
        self.stats = LoopStats()

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        self.history.reset(obs)
        self.queue.clear()
        self.inflight = None
        self.plan_end = 0
        self.last_action = None
        self.consecutive_misses = 0
        self.stats = LoopStats()

    def poll(self, tick: int, now_s: float, latency_p95_s: float) -> bool:
        """The start of every tick, in every driver: queue a chunk that has arrived by ``now_s``, then say whether
        to ask for the next one. The driver then starts that inference (``start``) and sends ``act(tick)``."""
        self.deliver_ready(tick, now_s)
        return self.wants_chunk(tick, latency_p95_s)

    def trigger_ticks(self, latency_p95_s: float) -> int:
        """Ask for the next chunk once no more than this many ticks remain queued."""
        if self.config.mode == "offline" or not self.config.asynchronous:
            return 0
        return math.ceil(latency_p95_s * self.config.control_hz - 1e-9) + self.config.prefetch_margin

    def wants_chunk(self, tick: int, latency_p95_s: float) -> bool:
        """No inference in flight, and at most ``trigger_ticks`` of the current plan's Ta actions are left."""
        return self.inflight is None and self.plan_end - tick <= self.trigger_ticks(latency_p95_s)

    def start(self, tick: int, ready_s: float, latency_s: float, chunk: np.ndarray | None = None) -> None:
        """An inference from the observation at ``tick``; its chunk is usable from ``ready_s`` on."""
        self.inflight = (tick, ready_s, chunk)
        self.stats.n_inferences += 1
        self.stats.latencies_s.append(latency_s)

    def deliver_ready(self, tick: int, now_s: float) -> bool:
        """Move a finished inference's chunk into the queue; True if one arrived."""
        if self.inflight is None or self.inflight[2] is None or self.inflight[1] > now_s + 1e-9:
            return False
        obs_tick, _, chunk = self.inflight
        self.inflight = None
        dropped, first = self.queue.add_chunk(chunk, obs_tick, tick)
        self.stats.stale_dropped += dropped
        self.plan_end = max(self.plan_end, first + self.n_action_steps)
        return True

    def act(self, tick: int) -> np.ndarray:
        """The action to send at ``tick``: the queued one, or the miss policy's."""
        item = self.queue.pop(tick)
        self.consecutive_misses = self.consecutive_misses + 1 if item is None else 0
        if item is None:
            self.stats.deadline_misses += 1
            if self.config.on_miss == "repeat" and self.last_action is not None:
                action = self.last_action
            elif self.hold_action is not None:
                action = self.hold_action(self.last_action)
            elif self.last_action is not None:
                action = self.last_action
            else:
                raise RuntimeError("deadline miss before any action was sent and no hold action is defined")
        else:
            action, obs_tick = item
            self.stats.executed += 1
            self.stats.age_sum_s += (tick - obs_tick) * self.config.dt
        self.last_action = np.asarray(action)
        return self.last_action


def env_hold_action(env) -> Callable[[np.ndarray | None], np.ndarray] | None:
    """The env's ``hold_action(last)`` if it declares one (robot stands still, gripper kept), else None."""
    fn = getattr(env, "hold_action", None)
    return fn if callable(fn) else None
