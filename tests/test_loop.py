"""The control loop on a simulated clock with fake latencies, and the wall-clock loop's watchdog."""
from __future__ import annotations

import re
import threading

import numpy as np
import pytest

from bac.loop import ActionQueue, LatencyModel, LoopConfig, Watchdog, run_wallclock, simulate

HOLD = -1.0


class ClockEnv:
    """Observation = the tick; records every action it is sent. Actions encode the tick they were planned for."""

    def __init__(self, horizon: int = 40):
        self.horizon = horizon
        self.sent: list[float] = []

    def reset(self, seed=None):
        self.t = 0
        self.sent = []
        return {"t": np.array([0.0], np.float32)}, {}

    def step(self, action):
        self.sent.append(float(action[0]))
        self.t += 1
        return {"t": np.array([self.t], np.float32)}, 0.0, False, self.t >= self.horizon, {"is_success": False}

    def hold_action(self, last):
        return np.array([HOLD], np.float32)


def planner(n_actions: int):
    """predict: each chunk's action k is 'the tick it is meant for' = observed tick + k."""

    def predict(obs):
        t = obs["t"][:, -1, 0]  # (B,)
        return (t[:, None] + np.arange(n_actions)[None, :])[..., None].astype(np.float32)  # (B, n, 1)

    return predict


def run(config, latency_s=None, n_actions=8, ta=8, horizon=40, n_envs=1):
    envs = [ClockEnv(horizon) for _ in range(n_envs)]
    lat = LatencyModel(fixed_s=latency_s) if latency_s is not None else None
    res = simulate(envs, list(range(n_envs)), planner(n_actions), 2, ta, horizon, config, lat)
    return envs, res


def test_offline_equals_sync_equals_async_at_zero_latency():
    offline, _ = run(LoopConfig(mode="offline"))
    sync, _ = run(LoopConfig(mode="realtime", asynchronous=False), latency_s=0.0)
    asyn, res = run(LoopConfig(mode="realtime", asynchronous=True), latency_s=0.0)
    assert offline[0].sent == sync[0].sent == asyn[0].sent == [float(t) for t in range(40)]
    assert res[0].loop["deadline_misses"] == 0 and res[0].loop["stale_dropped"] == 0
    assert res[0].loop["action_age_ms"] == pytest.approx(1000 * np.mean([k * 0.05 for k in range(8)]))
    # simulate's default config is the offline loop.
    envs = [ClockEnv()]
    simulate(envs, [0], planner(8), 2, 8, 40)
    assert envs[0].sent == offline[0].sent


def test_actions_execute_at_their_timestamps_and_stale_ones_are_dropped():
    # Sync, 3 ticks of latency (0.15 s at 20 Hz): after the first chunk, each chunk arrives 3 ticks late.
    envs, res = run(LoopConfig(mode="realtime", asynchronous=False), latency_s=0.15)
    sent = envs[0].sent
    for tick, a in enumerate(sent):
        assert a == HOLD or a == tick  # every executed action is the one planned for that very tick
    # Ticks 0-7 from the free first chunk; then each plan of 8: asked at its start, 3 held ticks, 5 actions.
    assert sent[:8] == list(range(8)) and sent[8:11] == [HOLD] * 3 and sent[11:16] == [11, 12, 13, 14, 15]
    loop = res[0].loop
    assert loop["deadline_misses"] == sent.count(HOLD) == 3 * 4
    assert loop["stale_dropped"] == 3 * 4
    assert len(loop["latencies_ms"]) == loop["n_inferences"] == 5


def test_async_prefetch_hides_latency_and_keep_executing_shifts_the_chunk():
    envs, res = run(LoopConfig(mode="realtime", asynchronous=True), latency_s=0.15)
    assert HOLD not in envs[0].sent and res[0].loop["deadline_misses"] == 0
    assert all(a == t for t, a in enumerate(envs[0].sent))
    # drop_stale=False: a late chunk is executed in full, starting when it arrives.
    envs, res = run(LoopConfig(mode="realtime", asynchronous=False, drop_stale=False), latency_s=0.15)
    sent = envs[0].sent
    assert sent[8:11] == [HOLD] * 3 and sent[11:19] == list(range(8, 16))
    assert res[0].loop["stale_dropped"] == 0


def test_extra_chunk_actions_stand_in_for_a_late_chunk():
    # 15 actions per chunk, Ta 8, sync, 3 ticks late: the old chunk's actions 8-10 cover the wait.
    envs, res = run(LoopConfig(mode="realtime", asynchronous=False), latency_s=0.15, n_actions=15)
    assert HOLD not in envs[0].sent and all(a == t for t, a in enumerate(envs[0].sent))
    assert res[0].loop["deadline_misses"] == 0


def test_repeat_miss_policy_and_temporal_ensembling():
    envs, _ = run(LoopConfig(mode="realtime", asynchronous=False, on_miss="repeat"), latency_s=0.15)
    assert envs[0].sent[8:11] == [7.0, 7.0, 7.0]
    q = ActionQueue(ensemble=0.5)
    q.add_chunk(np.array([[0.0], [1.0]]), obs_tick=0, now_tick=0)
    q.add_chunk(np.array([[10.0], [11.0]]), obs_tick=1, now_tick=1)
    assert q.pop(0)[0][0] == 0.0
    w = np.exp(-0.5 * np.arange(2))
    a, age_tick = q.pop(1)
    assert a[0] == pytest.approx((w[0] * 1.0 + w[1] * 10.0) / w.sum())
    assert age_tick == pytest.approx((w[0] * 0 + w[1] * 1) / w.sum())


def test_batched_streams_match_single_streams():
    envs, _ = run(LoopConfig(mode="realtime", asynchronous=True), latency_s=0.15, n_envs=3)
    single, _ = run(LoopConfig(mode="realtime", asynchronous=True), latency_s=0.15)
    assert all(e.sent == single[0].sent for e in envs)


def test_bad_loop_configs_are_named():
    with pytest.raises(ValueError, match="mode"):
        LoopConfig(mode="fast")
    with pytest.raises(ValueError, match="on_miss"):
        LoopConfig(on_miss="panic")
    with pytest.raises(ValueError, match="LatencyModel"):
        simulate([ClockEnv()], [0], planner(8), 2, 8, 10, LoopConfig(mode="realtime"))


# ------------------------------------------------------------------------------------------- wall clock
class FakeRobot:
    control_hz = 200.0

    def __init__(self, nan_at: int | None = None):
        self.t, self.sent, self.stopped, self.nan_at = 0, [], False, nan_at

    def get_observation(self):
        v = np.nan if self.nan_at is not None and self.t >= self.nan_at else float(self.t)
        return {"t": np.array([v], np.float32)}

    def send_action(self, action):
        self.sent.append(float(action[0]))
        self.t += 1

    def hold_action(self, last):
        return np.array([HOLD], np.float32)

    def stop(self):
        self.stopped = True


def wall(robot, predict, steps=30, **kw):
    threads = threading.active_count()
    out = run_wallclock(robot, predict, 2, 8, steps, LoopConfig(mode="realtime", control_hz=robot.control_hz), **kw)
    assert threading.active_count() <= threads  # the policy worker is joined (one left by an earlier test may end)
    assert robot.stopped
    return out


def test_wallclock_runs_and_stops_cleanly():
    robot = FakeRobot()
    out = wall(robot, planner(8))
    assert out["stopped"] is None and out["ticks"] == 30 and len(robot.sent) == 30


def test_watchdog_stops_on_nan_observation():
    out = wall(FakeRobot(nan_at=5), planner(8))
    assert "NaN" in out["stopped"] and out["ticks"] == 4


class CameraRobot(FakeRobot):
    """A robot with a camera image and an instruction beside its state; ``fault`` breaks one at tick 5."""

    def __init__(self, fault: str | None = None):
        super().__init__()
        self.fault = fault

    def get_observation(self):
        obs = super().get_observation()
        obs["agentview_image"] = np.full((8, 8, 3), self.t % 256, np.uint8)
        obs["instruction"] = "put the round nut on its peg"
        if self.t >= 5 and self.fault == "empty text":
            obs["instruction"] = "  "
        elif self.t >= 5 and self.fault == "resized image":
            obs["agentview_image"] = np.zeros((4, 4, 3), np.uint8)
        elif self.t >= 5 and self.fault == "camera dropped":
            del obs["agentview_image"]
        elif self.t >= 5 and self.fault == "object":
            obs["instruction"] = None
        return obs


def test_images_and_instruction_reach_the_policy():
    """The history and the worker pass images (B, To, H, W, 3) uint8 and the instruction (B, To) text through."""
    seen = []

    def predict(obs):
        seen.append({k: (v.shape, v.dtype.kind) for k, v in obs.items()})
        assert obs["instruction"][0, -1] == "put the round nut on its peg"
        return planner(8)(obs)

    out = wall(CameraRobot(), predict)
    assert out["stopped"] is None and out["ticks"] == 30
    assert seen[0] == {"t": ((1, 2, 1), "f"), "agentview_image": ((1, 2, 8, 8, 3), "u"), "instruction": ((1, 2), "U")}


@pytest.mark.parametrize("fault, reason", [
    ("empty text", "observation 'instruction' is empty text"),
    ("resized image", r"observation 'agentview_image' changed from \(8, 8, 3\) uint8 to \(4, 4, 3\) uint8"),
    ("camera dropped", r"observation keys changed: missing \['agentview_image'\]"),
    ("object", "observation 'instruction' is neither numbers nor text"),
])
def test_watchdog_stops_on_a_broken_camera_or_instruction(fault, reason):
    out = wall(CameraRobot(fault), planner(8))
    assert out["stopped"] is not None and re.search(reason, out["stopped"]), out["stopped"]
    assert out["ticks"] == 4


def test_watchdog_stops_on_policy_exception():
    calls = []

    def flaky(obs):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("policy exploded")
        return planner(8)(obs)

    out = wall(FakeRobot(), flaky)
    assert "policy exploded" in out["stopped"]


def test_watchdog_stops_after_consecutive_misses():
    import time

    def slow(obs):
        if obs["t"][0, -1, 0] > 0:
            time.sleep(0.5)  # 100 ticks at 200 Hz
        return planner(8)(obs)

    out = wall(FakeRobot(), slow, steps=200, watchdog=Watchdog(max_consecutive_misses=5))
    assert out["stopped"] == "5 deadline misses in a row (limit 5)" and out["deadline_misses"] == 5  # at the limit, not one past it


def test_ctrl_c_stops_the_robot_and_joins_the_worker():
    class InterruptingRobot(FakeRobot):
        def get_observation(self):
            if self.t == 7:
                raise KeyboardInterrupt
            return super().get_observation()

    out = wall(InterruptingRobot(), planner(8))
    assert out["stopped"] == "interrupted (Ctrl-C)" and out["ticks"] == 6
