"""The offline rollout loop and the reported statistics."""
from __future__ import annotations

import numpy as np
import pytest

from bac.metrics import latency_stats, wilson_interval
from bac.loop import simulate as rollout  # the offline loop is simulate's default
from bac.rollout import ObsHistory
from envs import make_env
from policies.data import make_windows


def test_obs_history_pads_with_first_observation():
    h = ObsHistory(3)
    h.reset({"x": np.array([1.0])})
    assert h.stacked()["x"].tolist() == [[1.0], [1.0], [1.0]]
    h.push({"x": np.array([2.0])})
    assert h.stacked()["x"].tolist() == [[1.0], [1.0], [2.0]]


def test_rollout_executes_chunks_and_reports_each_episode():
    envs = [make_env("toy") for _ in range(3)]
    seen_batches, finished = [], []

    def expert_chunk(obs):  # head straight for the goal: blocked by the wall, never succeeds
        seen_batches.append(obs["agent_pos"].shape)
        direction = np.clip((obs["goal_pos"][:, -1] - obs["agent_pos"][:, -1]) / 0.08, -1, 1)
        return np.repeat(direction[:, None], 4, axis=1)  # (B, Ta=4, 2)

    results = rollout(envs, [0, 1, 2], expert_chunk, n_obs_steps=2, n_action_steps=4, max_steps=20,
                      on_episode_end=finished.append)
    assert [r.seed for r in results] == [0, 1, 2]
    assert all(not r.success and r.steps == 20 and r.n_chunks == 5 for r in results)
    assert seen_batches[0] == (3, 2, 2) and len(seen_batches) == 5
    assert len(finished) == 3


def test_rollout_rejects_bad_policy_output():
    with pytest.raises(ValueError, match=r"expected \(1, Ta, Da\)"):
        rollout([make_env("toy")], [0], lambda obs: np.zeros((2, 4, 2)), 2, 4, 10)


def test_wilson_interval_and_latency_stats():
    lo, hi = wilson_interval(40, 50)
    assert lo == pytest.approx(0.6696, abs=1e-3) and hi == pytest.approx(0.8876, abs=1e-3)
    assert wilson_interval(0, 50)[0] == 0.0 and wilson_interval(50, 50)[1] == pytest.approx(1.0)
    stats = latency_stats([0.001 * i for i in range(1, 101)])
    assert stats["p50"] == pytest.approx(50.5) and stats["p95"] == pytest.approx(95.05)


def test_make_windows_pads_like_diffusion_policy():
    demo = {"obs": np.arange(5, dtype=np.float32)[:, None], "actions": np.arange(5, dtype=np.float32)[:, None] * 10}
    obs, act = make_windows([demo], horizon=4, n_obs_steps=2, n_action_steps=3)
    # padded length 1 + 5 + 2 = 8 -> 5 windows of 4
    assert obs.shape == (5, 2, 1) and act.shape == (5, 4, 1)
    assert obs[0, :, 0].tolist() == [0, 0] and act[0, :, 0].tolist() == [0, 0, 10, 20]
    assert act[-1, :, 0].tolist() == [30, 40, 40, 40]


def test_dataset_missing_obs_keys_are_named(tmp_path):
    from envs.recorder import DemoWriter
    from policies.data import load_demos

    path = tmp_path / "d.hdf5"
    with DemoWriter(path, {"env_name": "x"}) as w:
        w.add({"robot0_eef_pos": np.zeros((3, 3))}, np.zeros((3, 7)))
    with pytest.raises(KeyError, match=r"lacks observation keys \['object'\]"):
        load_demos(path, ["object", "robot0_eef_pos"])
    with pytest.raises(FileNotFoundError, match="eval/collect.py"):
        load_demos(tmp_path / "missing.hdf5", ["object"])
