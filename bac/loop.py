"""The control loop: observation history, a timestamped action queue, and a policy called synchronously or ahead.

One ``Stream`` holds one robot's (or one episode's) loop state; the drivers own the clock:

- ``simulate`` steps many gymnasium envs in lockstep on a simulated clock, one batched policy call for all streams
  that ask for a chunk at the same tick. ``mode="offline"``: the world waits for the policy (Diffusion Policy's
  evaluation protocol). ``mode="realtime"``: the world advances one control period per tick while the policy
  computes; an inference started at time t delivers its chunk at t + latency, the latency drawn from a
  ``LatencyModel`` (measured batch-1 latencies, or a fixed value, times a scale), so a run is reproducible given
  the latencies.
- ``run_wallclock`` (``bac.wallclock``) drives one ``Robot`` on the wall clock with the policy in a worker thread
  and a watchdog.

Both run the same tick on a ``bac.stream.Stream``: ``poll`` (queue what has arrived, ask for the next chunk?),
``start``, ``act``.

A chunk may carry more actions than the ``n_action_steps`` (Ta) executed per plan (e.g. the rest of the predicted
horizon): the loop replans after Ta of them, and the extra ones stand in when the next chunk is late.

Time: tick n is the n-th control period, at ``n / control_hz`` seconds after the episode starts. The observation
taken at tick n conditions a chunk whose action k is meant for tick n + k (the chunk starts at the current
observation's step). An action whose tick has passed when its chunk arrives is stale: dropped
(``drop_stale=True``), or the whole chunk is shifted to start now and executed late (``drop_stale=False``,
"keep executing the queue"). A tick with no action is a deadline miss, handled by ``on_miss``: ``hold`` sends
the robot's hold action (stand still, keep the gripper), ``repeat`` repeats the last action sent.

Asynchronous inference asks for the next chunk while the current one executes: as soon as no more queued ticks
remain than the expected latency covers (``ceil(latency_p95 * control_hz)`` plus ``prefetch_margin``). At zero
latency that is when the queue is empty, so the asynchronous path equals the synchronous one. Overlapping chunks
either replace the queued actions (the newer chunk wins) or, with ``ensemble=k``, are averaged with ACT's
temporal-ensembling weights ``exp(-k i)`` (i = 0 the oldest prediction for that tick).

This module knows nothing about models or simulators beyond ``predict(obs) -> actions``, the gymnasium API
and ``info["is_success"]``.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import numpy as np

from bac.rollout import BatchTiming, EpisodeResult, Predict
from bac.stream import (MISS_POLICIES, MODES, ActionQueue, LatencyModel, LoopConfig, LoopStats, Stream,  # noqa: F401
                        env_hold_action)
from bac.wallclock import Robot, SafeStop, Watchdog, run_wallclock  # noqa: F401 (the loop's public names)


def simulate(
    envs: Sequence,
    seeds: Sequence[int],
    predict: Predict,
    n_obs_steps: int,
    n_action_steps: int,
    max_steps: int,
    config: LoopConfig | None = None,
    latency: LatencyModel | None = None,
    record_video: Sequence[bool] | bool = False,
    on_episode_end: Callable[[EpisodeResult], None] | None = None,
    timing: BatchTiming | None = None,
) -> list[EpisodeResult]:
    """Run one episode per env (``len(envs) == len(seeds)``) on the simulated clock; stop each at success or
    ``max_steps`` ticks. Streams that ask for a chunk at the same tick share one batched ``predict`` call.

    Offline: the world waits, so every chunk arrives at the tick it was asked for (latency 0 in world time).
    Realtime: each chunk arrives ``latency.draw()`` seconds after its observation. Every episode starts with its
    first chunk in hand (the robot waits at rest for the first inference, as on hardware).
    """
    config = config or LoopConfig()
    if len(envs) != len(seeds):
        raise ValueError(f"got {len(envs)} envs for {len(seeds)} seeds")
    if config.mode == "realtime" and latency is None:
        raise ValueError("the realtime loop needs a LatencyModel (measured samples or a fixed latency)")
    timing = timing if timing is not None else BatchTiming()
    n = len(envs)
    dt = config.dt
    p95 = latency.p95() if (latency is not None and config.mode == "realtime") else 0.0
    record = [bool(record_video)] * n if isinstance(record_video, bool) else [bool(r) for r in record_video]
    streams = [Stream(config, n_obs_steps, n_action_steps, env_hold_action(e)) for e in envs]
    results: list[EpisodeResult | None] = [None] * n
    rewards, sim_time = [0.0] * n, [0.0] * n
    frames: list[list] = [[] for _ in range(n)]
    for i, (env, seed) in enumerate(zip(envs, seeds)):
        obs, _ = env.reset(seed=int(seed))
        streams[i].reset(obs)
        if record[i]:
            frames[i].append(env.render())

    def finish(i: int, success: bool, steps: int, info: dict) -> None:
        s = streams[i].stats
        outcome = {k: v for k, v in info.items() if k != "is_success"} or None
        results[i] = EpisodeResult(int(seeds[i]), bool(success), steps, rewards[i], s.n_inferences, sim_time[i],
                                   frames[i], loop=s.to_json(), outcome=outcome)
        if on_episode_end is not None:
            on_episode_end(results[i])

    tick = 0
    while True:
        active = [i for i in range(n) if results[i] is None]
        if not active:
            break
        now = tick * dt
        ask = [i for i in active if streams[i].poll(tick, now, p95)]
        if ask:
            histories = [streams[i].history.stacked() for i in ask]
            batch = {k: np.stack([h[k] for h in histories]) for k in histories[0]}
            t0 = time.perf_counter()
            if getattr(predict, "takes_context", False):  # e.g. bac.warmstart: which streams ask, and when
                chunks = np.asarray(predict(batch, {"streams": [seeds[i] for i in ask], "tick": tick}))
            else:
                chunks = np.asarray(predict(batch))  # (B, Ta', Da)
            timing.policy_call_s.append(time.perf_counter() - t0)
            timing.batch_sizes.append(len(ask))
            if chunks.ndim != 3 or chunks.shape[0] != len(ask):
                raise ValueError(f"policy returned actions of shape {chunks.shape}; expected ({len(ask)}, Ta, Da)")
            for j, i in enumerate(ask):
                lat = latency.draw() if (config.mode == "realtime") else 0.0
                first = tick == 0
                streams[i].start(tick, now if first else now + lat, lat, chunks[j])
                streams[i].deliver_ready(tick, now)
        for i in active:
            action = streams[i].act(tick)
            t0 = time.perf_counter()
            obs, reward, terminated, truncated, info = envs[i].step(action)
            dt_env = time.perf_counter() - t0
            timing.env_step_s.append(dt_env)
            sim_time[i] += dt_env
            rewards[i] += float(reward)
            streams[i].history.push(obs)
            if record[i]:
                frames[i].append(envs[i].render())
            steps = tick + 1
            if info.get("is_success", False):
                finish(i, True, steps, info)
            elif terminated or truncated or steps >= max_steps:
                finish(i, False, steps, info)
        tick += 1
    return results  # type: ignore[return-value]
