"""Rollout building blocks: observation history, episode results, timing (the loop itself is bac.loop).

The policy is any ``predict(obs)`` callable: ``obs[key]`` is (B, To, d) numpy, the return value is the
action chunk (B, Ta, Da) numpy.
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np

Predict = Callable[[dict[str, np.ndarray]], np.ndarray]


class ObsHistory:
    """The last ``n_obs_steps`` observations of one env; at reset it is filled with copies of the first."""

    def __init__(self, n_obs_steps: int):
        if n_obs_steps < 1:
            raise ValueError(f"n_obs_steps must be >= 1, got {n_obs_steps}")
        self.n_obs_steps = n_obs_steps
        self._buf: deque[dict[str, np.ndarray]] = deque(maxlen=n_obs_steps)

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        self._buf.clear()
        for _ in range(self.n_obs_steps):
            self._buf.append(obs)

    def push(self, obs: dict[str, np.ndarray]) -> None:
        if not self._buf:
            raise RuntimeError("ObsHistory.push before reset")
        self._buf.append(obs)

    def stacked(self) -> dict[str, np.ndarray]:
        """key -> (To, d)."""
        return {k: np.stack([o[k] for o in self._buf]) for k in self._buf[0]}


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int
    reward: float
    n_chunks: int
    sim_time_s: float
    frames: list = field(default_factory=list, repr=False)
    loop: dict | None = None  # the control loop's per-episode stats (bac.stream.LoopStats.to_json)
    outcome: dict | None = None  # the env's last info beyond is_success (a language scene's goal, placed, handled)

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("frames")
        for key in ("loop", "outcome"):
            if d[key] is None:
                d.pop(key)
        return d


@dataclass
class BatchTiming:
    """Wall time of the batched policy calls and of env steps during a rollout."""

    policy_call_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    env_step_s: list[float] = field(default_factory=list)
