"""Cross-chunk reuse: start each chunk's denoising from the stream's previous chunk instead of pure noise.

Consecutive chunks of one control stream overlap in time: a chunk planned at tick n covers ticks n-(To-1) ..
n-(To-1)+T-1, and the next one is planned a few ticks later. ``WarmStart`` keeps each stream's last predicted
trajectory, shifts it by the ticks since (the remaining actions; past its end the last action is repeated), and
asks the sampler to noise that guess to step k0's level and run only the steps k0 .. K-1 (SDEdit-style warm
start, as streaming and real-time chunking policies do). ``start_step`` 0 is the plain cold start, call for call.

The memory is the runtime's, not the policy's: the policy stays a pure chunk predictor and gets the guess as an
argument. The loop tells the predictor which streams ask (``context``), so batched streams keep their own memory.
"""
from __future__ import annotations

from typing import Callable, Hashable

import numpy as np

# sample(obs (B, To, d) per key, init (B, T, Da) or None, start step) -> predicted trajectory (B, T, Da)
Sample = Callable[[dict[str, np.ndarray], np.ndarray | None, int], np.ndarray]


class WarmStart:
    """``predict(obs, context) -> (B, n_chunk, Da)`` for ``bac.loop.simulate``, warm-starting from memory.

    ``n_obs_steps`` (To) places the current tick in the trajectory (index To-1); ``n_chunk`` actions from there
    are returned. A stream whose previous trajectory no longer overlaps the new one (or that has none) starts
    cold; so does every call with ``start_step`` 0.
    """

    takes_context = True

    def __init__(self, sample: Sample, n_obs_steps: int, n_chunk: int, start_step: int):
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        self.sample, self.n_obs_steps, self.n_chunk, self.start_step = sample, n_obs_steps, n_chunk, start_step
        self.memory: dict[Hashable, tuple[np.ndarray, int]] = {}  # stream -> (trajectory (T, Da), its tick)
        self.n_warm = self.n_cold = 0

    def reset(self) -> None:
        self.memory.clear()

    def guess(self, key: Hashable, tick: int) -> np.ndarray | None:
        """The previous trajectory of ``key`` shifted to a chunk planned at ``tick`` (T, Da), or None."""
        if key not in self.memory:
            return None
        traj, prev_tick = self.memory[key]
        shift = tick - prev_tick
        T = traj.shape[0]
        if not 0 < shift < T - self.n_obs_steps + 1:  # nothing of the old plan lies ahead of the new one
            return None
        return traj[np.minimum(np.arange(T) + shift, T - 1)]  # (T, Da), the old plan's last action repeated

    def __call__(self, obs: dict[str, np.ndarray], context: dict | None = None) -> np.ndarray:
        B = next(iter(obs.values())).shape[0]
        keys = list(context["streams"]) if context else [None] * B
        tick = int(context["tick"]) if context else 0
        if len(keys) != B:
            raise ValueError(f"context names {len(keys)} streams for a batch of {B}")
        guesses = [self.guess(k, tick) if (self.start_step and k is not None) else None for k in keys]
        out = [None] * B
        for warm in (False, True):  # one batched call per kind (at a shared reset every stream is cold)
            idx = [i for i, g in enumerate(guesses) if (g is not None) == warm]
            if not idx:
                continue
            sub = {k: v[idx] for k, v in obs.items()} if len(idx) < B else obs
            init = np.stack([guesses[i] for i in idx]) if warm else None
            traj = np.asarray(self.sample(sub, init, self.start_step if warm else 0))  # (b, T, Da)
            for j, i in enumerate(idx):
                out[i] = traj[j]
            self.n_warm += len(idx) if warm else 0
            self.n_cold += 0 if warm else len(idx)
        trajs = np.stack(out)  # (B, T, Da)
        for k, traj in zip(keys, trajs):
            if k is not None:
                self.memory[k] = (traj, tick)
        start = self.n_obs_steps - 1
        return trajs[:, start : start + self.n_chunk]
