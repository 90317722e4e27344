"""The safety layer between policy and robot, each guard fired by an injected fault."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bac.loop import LoopConfig, Watchdog, run_wallclock
from bac.safety import ActionLimits, SafetyGuard, UnsafeAction

SAFE = np.array([0.0, 0.0, -1.0])  # no motion, gripper open


def limits(**kw) -> ActionLimits:
    return ActionLimits(low=-np.ones(3), high=np.ones(3), safe_action=SAFE, **kw)


def test_guard_clips_bounds_and_limits_rate_and_jerk():
    g = SafetyGuard(limits(max_rate=0.5, max_jerk=0.2))
    np.testing.assert_allclose(g.filter([2.0, -3.0, 0.0]), [1.0, -1.0, 0.0])  # clipped into the bounds
    np.testing.assert_allclose(g.filter([0.0, 1.0, 0.0]), [0.5, -0.5, 0.0])  # at most 0.5 per tick
    # the change may change by at most 0.2 per tick: after a change of (-0.5, +0.5, 0) the next one (rate-limited
    # to (0, +0.5, 0)) is held to (-0.3, +0.5, 0)
    np.testing.assert_allclose(g.filter([0.5, 1.0, 0.0]), [0.2, 0.0, 0.0], atol=1e-7)
    assert g.counts["bounds_clipped"] == 1 and g.counts["rate_limited"] == 2 and g.counts["jerk_limited"] == 1
    with pytest.raises(UnsafeAction, match="NaN"):
        g.filter([np.nan, 0, 0])
    with pytest.raises(UnsafeAction, match=r"shape \(6,\); the robot takes \(3,\)"):
        g.filter(np.zeros(6))
    assert g.counts["refused"] == 2
    np.testing.assert_array_equal(g.safe(), SAFE)


def test_limits_refuse_a_safe_action_that_could_fail():
    with pytest.raises(ValueError, match="safe action"):
        ActionLimits(low=-np.ones(3), high=np.ones(3), safe_action=[0, 0, 2.0])
    with pytest.raises(ValueError, match="safe action"):
        ActionLimits(low=-np.ones(3), high=np.ones(3), safe_action=[0, np.nan, 0])
    with pytest.raises(ValueError, match="max_rate must be positive"):
        limits(max_rate=0.0)


class Robot3:
    """A 3-dof robot that records what it receives; actions must be finite (3,) or it breaks."""

    control_hz = 200.0

    def __init__(self, send_error_at: int | None = None):
        self.t, self.sent, self.stopped, self.send_error_at = 0, [], False, send_error_at

    def get_observation(self):
        return {"t": np.array([float(self.t)], np.float32)}

    def send_action(self, action):
        a = np.asarray(action)
        assert a.shape == (3,) and np.all(np.isfinite(a)), f"the robot received {a}"
        if self.send_error_at is not None and self.t == self.send_error_at:
            self.send_error_at = None
            raise ConnectionError("robot link lost")
        self.sent.append(a.copy())
        self.t += 1

    def hold_action(self, last):
        return np.array([0.0, 0.0, last[2] if last is not None else -1.0], np.float32)  # breaks on a bad last

    def stop(self):
        self.stopped = True


def policy(fault: str | None = None, at: int = 2, release: threading.Event | None = None):
    calls = []

    def predict(obs):
        calls.append(1)
        chunk = np.tile(np.array([0.1, -0.1, 1.0], np.float32), (1, 8, 1))  # (1, Ta, 3)
        if fault and len(calls) >= at:
            if fault == "nan":
                chunk[0, :, 1] = np.nan
            elif fault == "wrong_size":
                chunk = np.zeros((1, 8, 6), np.float32)
            elif fault == "hang":
                release.wait(10.0)  # hangs until the test lets it go (no thread outlives the test)
        return chunk

    return predict


def wall(robot, predict, deadline_s=0.2, steps=60, max_misses=50):
    t0 = time.monotonic()
    out = run_wallclock(robot, predict, 2, 8, steps, LoopConfig(mode="realtime", control_hz=robot.control_hz),
                        Watchdog(max_consecutive_misses=max_misses, inference_deadline_s=deadline_s),
                        guard=SafetyGuard(limits(max_rate=0.5)))
    return out, time.monotonic() - t0


@pytest.mark.parametrize("fault, reason", [("nan", "NaN"), ("wrong_size", "shape (6,)")])
def test_bad_actions_never_reach_the_robot_and_stop_it_with_the_safe_action(fault, reason):
    robot = Robot3()
    out, _ = wall(robot, policy(fault))
    assert reason in out["stopped"] and robot.stopped and out["stop_errors"] == []
    np.testing.assert_array_equal(robot.sent[-1], SAFE)  # the last thing sent is the safe action
    assert all(np.all(np.isfinite(a)) and a.shape == (3,) for a in robot.sent)
    assert out["safety"]["refused"] == 1 and out["safety"]["safe_actions_sent"] == 1


def test_a_hung_first_inference_stops_the_robot_within_the_deadline():
    robot, release = Robot3(), threading.Event()
    try:
        out, elapsed = wall(robot, policy("hang", at=1, release=release), deadline_s=0.3)
    finally:
        release.set()
    assert out["stopped"] == "the first inference exceeded its 300 ms deadline"
    assert robot.stopped and elapsed < 0.3 + 1.0 + 0.5  # the deadline, the worker's 1 s join, slack
    np.testing.assert_array_equal(robot.sent, [SAFE])  # nothing but the safe action was ever sent


def test_a_hung_later_inference_stops_the_robot_within_the_deadline():
    robot, release = Robot3(), threading.Event()
    try:
        out, _ = wall(robot, policy("hang", at=3, release=release), deadline_s=0.3, steps=400, max_misses=1000)
    finally:
        release.set()
    assert "an inference exceeded its 300 ms deadline" in out["stopped"] and robot.stopped
    np.testing.assert_array_equal(robot.sent[-1], SAFE)


def test_an_exception_in_send_action_stops_the_robot():
    robot = Robot3(send_error_at=5)
    out, _ = wall(robot, policy())
    assert "ConnectionError: robot link lost" in out["stopped"] and robot.stopped
    np.testing.assert_array_equal(robot.sent[-1], SAFE)


def test_a_failing_hold_falls_back_to_the_safe_action():
    class NoHold(Robot3):
        def hold_action(self, last):
            raise RuntimeError("no hold here")

    robot = NoHold()

    def slow_second(obs):  # the second chunk is late: ticks go unserved and the hold is asked for
        if obs["t"][0, -1, 0] > 0:
            time.sleep(0.1)
        return policy()(obs)

    out, _ = wall(robot, slow_second, deadline_s=1.0, steps=40)
    assert out["stopped"] is None and out["deadline_misses"] > 0
    assert out["safety"]["safe_actions_sent"] == out["deadline_misses"]
    assert any(np.array_equal(a, SAFE) for a in robot.sent)
