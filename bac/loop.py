"""The control loop: observation history, a timestamped action queue, and a policy called synchronously or ahead.

One ``Stream`` holds one robot's (or one episode's) loop state; the drivers own the clock:

- ``simulate`` steps many gymnasium envs in lockstep on a simulated clock, one batched policy call for all streams
  that ask for a chunk at the same tick. ``mode="offline"``: the world waits for the policy (Diffusion Policy's
  evaluation protocol). ``mode="realtime"``: the world advances one control period per tick while the policy
  computes; an inference started at time t delivers its chunk at t + latency, the latency drawn from a
  ``LatencyModel`` (measured batch-1 latencies, or a fixed value, times a scale), so a run is reproducible given
  the latencies.
- ``run_wallclock`` drives one ``Robot`` on the wall clock with the policy in a worker thread and a watchdog.

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

import math
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import numpy as np

from bac.rollout import BatchTiming, EpisodeResult, ObsHistory, Predict
from bac.safety import SafetyGuard, UnsafeAction

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
        self.stats = LoopStats()

    def reset(self, obs: dict[str, np.ndarray]) -> None:
        self.history.reset(obs)
        self.queue.clear()
        self.inflight = None
        self.plan_end = 0
        self.last_action = None
        self.stats = LoopStats()

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

    def finish(i: int, success: bool, steps: int) -> None:
        s = streams[i].stats
        results[i] = EpisodeResult(int(seeds[i]), bool(success), steps, rewards[i], s.n_inferences, sim_time[i],
                                   frames[i], loop=s.to_json())
        if on_episode_end is not None:
            on_episode_end(results[i])

    tick = 0
    while True:
        active = [i for i in range(n) if results[i] is None]
        if not active:
            break
        now = tick * dt
        for i in active:
            streams[i].deliver_ready(tick, now)
        ask = [i for i in active if streams[i].wants_chunk(tick, p95)]
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
                finish(i, True, steps)
            elif terminated or truncated or steps >= max_steps:
                finish(i, False, steps)
        tick += 1
    return results  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------- wall clock
class Robot(Protocol):
    """What the wall-clock loop needs from a robot (a real one, or ``envs.sim_robot.SimRobot``)."""

    control_hz: float

    def get_observation(self) -> dict[str, np.ndarray]: ...

    def send_action(self, action: np.ndarray) -> None: ...

    def hold_action(self, last: np.ndarray | None) -> np.ndarray: ...

    def stop(self) -> None: ...


class SafeStop(RuntimeError):
    """The watchdog stopped the robot; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class Watchdog:
    """Safe-stop rules of the wall-clock loop: ``max_consecutive_misses`` missed control deadlines in a row, an
    inference running longer than ``inference_deadline_s`` (the first one included), or a bad observation."""

    max_consecutive_misses: int = 10
    inference_deadline_s: float | None = None

    def __post_init__(self):
        if self.max_consecutive_misses < 1:
            raise ValueError(f"max_consecutive_misses must be >= 1, got {self.max_consecutive_misses}")
        if self.inference_deadline_s is not None and not self.inference_deadline_s > 0:
            raise ValueError(f"inference_deadline_s must be positive, got {self.inference_deadline_s}")

    def check_obs(self, obs: dict[str, np.ndarray]) -> None:
        for k, v in obs.items():
            if not np.all(np.isfinite(np.asarray(v, dtype=np.float64))):
                raise SafeStop(f"observation {k!r} holds NaN or inf")


class _Worker:
    """One policy call at a time on a background thread (so the control loop keeps its rate)."""

    def __init__(self, predict: Predict, latency_scale: float = 1.0):
        self.predict = predict
        self.latency_scale = latency_scale
        self.requests: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="bac-policy-worker", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            item = self.requests.get()
            if item is None:
                return
            tick, obs = item
            t0 = time.perf_counter()
            try:
                chunk = np.asarray(self.predict({k: v[None] for k, v in obs.items()}))[0]
                elapsed = time.perf_counter() - t0
                if self.latency_scale > 1.0:  # emulate a slower device
                    time.sleep(elapsed * (self.latency_scale - 1.0))
                self.results.put((tick, chunk, time.perf_counter() - t0, None))
            except BaseException as e:  # noqa: BLE001 - handed to the control thread, which stops the robot
                self.results.put((tick, None, time.perf_counter() - t0, e))

    def close(self, timeout_s: float = 30.0) -> None:
        """Ask the worker to finish and wait for it; a hung policy call is left behind (a daemon thread)."""
        self.requests.put(None)
        self.thread.join(timeout=timeout_s)


def _stop(robot: Robot, guard: SafetyGuard | None) -> list[str]:
    """Stop the robot: with a guard (a fault stopped the run), the declared safe action first; then its own
    ``stop``. Errors are collected, not raised, so that both always run."""
    errors = []
    if guard is not None:
        try:
            robot.send_action(guard.safe())
        except Exception as e:  # noqa: BLE001
            errors.append(f"safe action: {type(e).__name__}: {e}")
    try:
        robot.stop()
    except Exception as e:  # noqa: BLE001
        errors.append(f"stop: {type(e).__name__}: {e}")
    return errors


def run_wallclock(
    robot: Robot,
    predict: Predict,
    n_obs_steps: int,
    n_action_steps: int,
    max_steps: int,
    config: LoopConfig | None = None,
    watchdog: Watchdog | None = None,
    log: Callable[[dict], None] | None = None,
    latency_scale: float = 1.0,
    should_stop: Callable[[], bool] | None = None,
    guard: SafetyGuard | None = None,
) -> dict:
    """Drive ``robot`` at ``config.control_hz`` on the wall clock for up to ``max_steps`` ticks.

    The policy runs on a worker thread; the control thread sleeps to each tick's deadline, moves finished chunks
    into the queue, asks for the next one (synchronously: when the queue is empty; asynchronously: ahead, by the
    p95 of the latencies seen so far), and sends the queued action or the miss policy's. The watchdog stops the
    robot safely after ``max_consecutive_misses`` misses in a row, an inference past the watchdog's deadline, a
    NaN observation, or an exception (the policy's and the robot's included); Ctrl-C stops it too. With a
    ``guard`` (``bac.safety``) every action is checked and limited before it is sent, an unsafe one (wrong shape,
    NaN) stops the robot, and a stop for any of these reasons first sends the declared safe action. ``log`` gets
    one dict per tick. Returns a summary dict with ``stopped`` (the reason, or None when ``max_steps`` or
    ``should_stop`` ended the run) and ``safety`` (what the guard did). The worker thread is joined before
    returning unless an inference hangs past its deadline (it is then left behind as a daemon thread).
    """
    config = config or LoopConfig(mode="realtime")
    watchdog = watchdog or Watchdog()
    deadline_s = watchdog.inference_deadline_s
    dt = config.dt

    def hold(last):  # the robot's hold, from the last action actually sent; the safe action if it fails
        try:
            return robot.hold_action(guard.last_sent if guard is not None else last)
        except Exception:  # noqa: BLE001
            if guard is None:
                raise
            return guard.safe()

    stream = Stream(config, n_obs_steps, n_action_steps, hold)
    worker = _Worker(predict, latency_scale)
    stopped: str | None = None
    consecutive = 0
    tick = 0
    requested_at = time.monotonic()
    t_start = time.monotonic()
    try:
        obs = robot.get_observation()
        watchdog.check_obs(obs)
        stream.reset(obs)
        # The first chunk: the robot waits at rest for it, and the episode clock starts when it arrives.
        worker.requests.put((0, stream.history.stacked()))
        stream.start(0, float("inf"), 0.0)
        try:
            _, chunk, lat, err = worker.results.get(timeout=deadline_s)
        except queue.Empty:
            raise SafeStop(f"the first inference exceeded its {1e3 * deadline_s:.0f} ms deadline") from None
        if err is not None:
            raise err
        stream.stats.latencies_s[-1] = lat
        stream.inflight = (0, 0.0, chunk)
        t_start = time.monotonic()
        while tick < max_steps and not (should_stop and should_stop()):
            deadline = t_start + tick * dt
            delay = deadline - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            now = tick * dt
            while True:  # collect finished inferences
                try:
                    obs_tick, chunk, lat, err = worker.results.get_nowait()
                except queue.Empty:
                    break
                if err is not None:
                    raise err
                stream.stats.latencies_s[-1] = lat
                stream.inflight = (obs_tick, now, chunk)
            stream.deliver_ready(tick, now)
            waited = time.monotonic() - requested_at
            if deadline_s is not None and stream.inflight is not None and stream.inflight[2] is None and waited > deadline_s:
                raise SafeStop(f"an inference exceeded its {1e3 * deadline_s:.0f} ms deadline ({1e3 * waited:.0f} ms)")
            lat_p95 = float(np.percentile(stream.stats.latencies_s, 95)) if stream.stats.latencies_s else 0.0
            if stream.wants_chunk(tick, lat_p95):
                worker.requests.put((tick, stream.history.stacked()))
                requested_at = time.monotonic()
                stream.start(tick, float("inf"), 0.0)  # ready time set when the worker answers
            misses_before = stream.stats.deadline_misses
            action = stream.act(tick)
            consecutive = consecutive + 1 if stream.stats.deadline_misses > misses_before else 0
            if guard is not None:
                try:
                    action = guard.filter(action)
                except UnsafeAction as e:
                    raise SafeStop(f"unsafe action refused: {e}") from None
            robot.send_action(action)
            obs = robot.get_observation()
            watchdog.check_obs(obs)
            stream.history.push(obs)
            if log is not None:
                log({"tick": tick, "t_s": round(time.monotonic() - t_start, 4), "miss": consecutive > 0,
                     "action": np.asarray(action).round(4).tolist()})
            if consecutive >= watchdog.max_consecutive_misses:
                raise SafeStop(f"{consecutive} deadline misses in a row (limit {watchdog.max_consecutive_misses})")
            tick += 1
    except SafeStop as e:
        stopped = e.reason
    except KeyboardInterrupt:
        stopped = "interrupted (Ctrl-C)"
    except Exception as e:  # noqa: BLE001 - any failure stops the robot; the reason is reported
        stopped = f"exception: {type(e).__name__}: {e}"
    finally:  # runs whatever happened above, and raises nothing itself
        stop_errors = _stop(robot, guard if stopped is not None else None)
        worker.close(timeout_s=1.0 if stopped is not None else 30.0)
    elapsed = time.monotonic() - t_start
    summary = {"ticks": tick, "elapsed_s": round(elapsed, 3), "stopped": stopped} | stream.stats.to_json()
    summary["safety"] = dict(guard.counts) if guard is not None else None
    summary["stop_errors"] = stop_errors
    summary["control_hz"] = round(stream.stats.executed / elapsed, 2) if elapsed > 0 else 0.0
    if log is not None:
        log({"summary": summary})
    return summary
