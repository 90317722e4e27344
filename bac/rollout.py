"""Offline rollouts: many episodes stepped in lockstep, one batched policy call per replanning point.

The policy is any ``predict(obs)`` callable: ``obs[key]`` is (B, To, d) numpy, the return value is the
action chunk (B, Ta, Da) numpy. This module owns time (observation history, chunk execution, episode
ends); it knows nothing about models or simulators beyond the gymnasium API and ``info["is_success"]``.
In the offline loop the world waits for the policy, as in Diffusion Policy's evaluation.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

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

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("frames")
        return d


@dataclass
class BatchTiming:
    """Wall time of the batched policy calls and of env steps during a rollout."""

    policy_call_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    env_step_s: list[float] = field(default_factory=list)


def rollout(
    envs: Sequence,
    seeds: Sequence[int],
    predict: Predict,
    n_obs_steps: int,
    n_action_steps: int,
    max_steps: int,
    record_video: Sequence[bool] | bool = False,
    on_episode_end: Callable[[EpisodeResult], None] | None = None,
    timing: BatchTiming | None = None,
) -> list[EpisodeResult]:
    """Run one episode per env (``len(envs) == len(seeds)``) in lockstep; stop each at success or ``max_steps``.

    Every ``n_action_steps`` env steps the still-running envs' histories are stacked into one batch
    (B, To, d) and the first ``n_action_steps`` actions of the returned chunk are executed open loop.
    ``on_episode_end`` is called as soon as an episode finishes (so results can be appended to disk).
    ``record_video`` (one flag, or one per env) keeps each step's ``env.render()`` frame in the result.
    """
    if len(envs) != len(seeds):
        raise ValueError(f"got {len(envs)} envs for {len(seeds)} seeds")
    timing = timing if timing is not None else BatchTiming()
    n = len(envs)
    record = [bool(record_video)] * n if isinstance(record_video, bool) else [bool(r) for r in record_video]
    histories = [ObsHistory(n_obs_steps) for _ in range(n)]
    results: list[EpisodeResult | None] = [None] * n
    steps, rewards, chunks = [0] * n, [0.0] * n, [0] * n
    sim_time = [0.0] * n
    frames: list[list] = [[] for _ in range(n)]
    for i, (env, seed) in enumerate(zip(envs, seeds)):
        obs, _ = env.reset(seed=int(seed))
        histories[i].reset(obs)
        if record[i]:
            frames[i].append(env.render())

    def finish(i: int, success: bool) -> None:
        results[i] = EpisodeResult(int(seeds[i]), bool(success), steps[i], rewards[i], chunks[i], sim_time[i], frames[i])
        if on_episode_end is not None:
            on_episode_end(results[i])

    while True:
        active = [i for i in range(n) if results[i] is None]
        if not active:
            break
        batch = {k: np.stack([histories[i].stacked()[k] for i in active]) for k in histories[active[0]].stacked()}
        t0 = time.perf_counter()
        actions = np.asarray(predict(batch))  # (B, Ta', Da)
        timing.policy_call_s.append(time.perf_counter() - t0)
        timing.batch_sizes.append(len(active))
        if actions.ndim != 3 or actions.shape[0] != len(active):
            raise ValueError(f"policy returned actions of shape {actions.shape}; expected ({len(active)}, Ta, Da)")
        for j, i in enumerate(active):
            chunks[i] += 1
            for a in actions[j, :n_action_steps]:
                t0 = time.perf_counter()
                obs, reward, terminated, truncated, info = envs[i].step(a)
                dt = time.perf_counter() - t0
                timing.env_step_s.append(dt)
                sim_time[i] += dt
                steps[i] += 1
                rewards[i] += float(reward)
                histories[i].push(obs)
                if record[i]:
                    frames[i].append(envs[i].render())
                if info.get("is_success", False):
                    finish(i, True)
                    break
                if terminated or truncated or steps[i] >= max_steps:
                    finish(i, False)
                    break
    return results  # type: ignore[return-value]
