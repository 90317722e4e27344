"""The wall-clock driver: one ``Robot`` at its control rate, the policy on a worker thread, a watchdog and a guard.

It runs the tick of ``bac.stream.Stream`` (the simulated driver ``bac.loop.simulate`` runs the same one) on
``time.monotonic``: it sleeps to each tick's deadline, collects finished inferences, asks for the next chunk
ahead by the p95 of the latencies seen so far, and sends the queued action through ``bac.safety.SafetyGuard``.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from bac.rollout import Predict
from bac.safety import SafetyGuard, UnsafeAction
from bac.stream import LoopConfig, Stream


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

    def check_obs(self, obs: dict, reference: dict | None = None) -> None:
        """Stop on a bad observation: numbers (state, uint8 images) that are not finite, text (an instruction) that
        is empty, anything else; with ``reference`` (the run's first observation), keys, shapes or kinds that
        changed (a camera dropped, a resized image, an instruction turned into numbers)."""
        for k, v in obs.items():
            arr = np.asarray(v)
            if arr.dtype.kind in "US":
                if any(not str(s).strip() for s in arr.flat):
                    raise SafeStop(f"observation {k!r} is empty text")
            elif arr.dtype.kind not in "biuf":
                raise SafeStop(f"observation {k!r} is neither numbers nor text ({type(v).__name__}, dtype {arr.dtype})")
            elif arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise SafeStop(f"observation {k!r} holds NaN or inf")
        if reference is None:
            return
        if set(obs) != set(reference):
            raise SafeStop(f"observation keys changed: missing {sorted(set(reference) - set(obs))}, "
                           f"new {sorted(set(obs) - set(reference))}")
        for k, v in obs.items():
            arr, ref = np.asarray(v), np.asarray(reference[k])
            text, ref_text = arr.dtype.kind in "US", ref.dtype.kind in "US"
            if text != ref_text or (not text and (arr.shape != ref.shape or arr.dtype != ref.dtype)):
                raise SafeStop(f"observation {k!r} changed from {ref.shape} {ref.dtype} to {arr.shape} {arr.dtype}")


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
        obs = first = robot.get_observation()
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
            lat_p95 = float(np.percentile(stream.stats.latencies_s, 95)) if stream.stats.latencies_s else 0.0
            wants = stream.poll(tick, now, lat_p95)
            waited = time.monotonic() - requested_at
            if deadline_s is not None and stream.inflight is not None and stream.inflight[2] is None and waited > deadline_s:
                raise SafeStop(f"an inference exceeded its {1e3 * deadline_s:.0f} ms deadline ({1e3 * waited:.0f} ms)")
            if wants:
                worker.requests.put((tick, stream.history.stacked()))
                requested_at = time.monotonic()
                stream.start(tick, float("inf"), 0.0)  # ready time set when the worker answers
            action = stream.act(tick)
            consecutive = stream.consecutive_misses
            if guard is not None:
                try:
                    action = guard.filter(action)
                except UnsafeAction as e:
                    raise SafeStop(f"unsafe action refused: {e}") from None
            robot.send_action(action)
            obs = robot.get_observation()
            watchdog.check_obs(obs, first)
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
