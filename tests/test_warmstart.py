"""Cross-chunk reuse: the warm start's shift, its memory per stream, the policy's partial run, and exactness."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bac.engine import attach
from bac.loop import LoopConfig, simulate
from bac.schedule import compute_all, uniform
from bac.warmstart import WarmStart
from tests.test_loop import ClockEnv
from tests.test_policy import StepRecorder, obs_batch, small_policy


def test_guess_is_the_previous_trajectory_shifted_by_the_ticks_since():
    ws = WarmStart(lambda obs, init, k: None, n_obs_steps=2, n_chunk=8, start_step=3)
    traj = np.arange(16, dtype=np.float32)[:, None]  # (T, 1): index j is planned for tick 10 - 1 + j
    ws.memory["a"] = (traj, 10)
    g = ws.guess("a", 18)  # 8 ticks later: index j of the new plan is index j + 8 of the old one
    assert g[:, 0].tolist() == list(range(8, 16)) + [15] * 8
    assert ws.guess("a", 10 + 15) is None  # no action of the old plan lies ahead of the new one
    assert ws.guess("a", 10) is None and ws.guess("b", 18) is None


def test_streams_keep_their_own_memory_in_a_batched_loop():
    """Each stream's second chunk starts from its own first chunk, shifted by the Ta executed ticks."""
    calls = []

    def sample(obs, init, k0):  # a trajectory that encodes the stream (its observed tick + an offset per env)
        calls.append((None if init is None else init.copy(), k0))
        t = obs["t"][:, -1, 0]
        return (t[:, None] + np.arange(16)[None, :] - 1 + 100 * obs["env"][:, -1, 0][:, None])[..., None]

    class TaggedEnv(ClockEnv):
        def __init__(self, tag):
            super().__init__(horizon=16)
            self.tag = tag

        def reset(self, seed=None):
            obs, info = super().reset(seed)
            return {**obs, "env": np.array([self.tag], np.float32)}, info

        def step(self, action):
            obs, *rest = super().step(action)
            return ({**obs, "env": np.array([self.tag], np.float32)}, *rest)

    ws = WarmStart(sample, n_obs_steps=2, n_chunk=8, start_step=4)
    envs = [TaggedEnv(0), TaggedEnv(1)]
    simulate(envs, [5, 6], ws, 2, 8, 16, LoopConfig(mode="offline"))
    assert [k for _, k in calls] == [0, 4]  # the first chunks cold (one call), the second ones warm
    init = calls[1][0]  # (2, T, 1): env e's guess at tick 8 is its own plan from tick 0, shifted by 8
    for e in range(2):
        expected = np.minimum(np.arange(16) + 8, 15) - 1 + 100 * e
        assert init[e, :, 0].tolist() == expected.tolist()
    assert envs[1].sent[:16] == [100.0 + t for t in range(16)]  # actions as planned: the tick plus the tag
    assert ws.n_cold == 2 and ws.n_warm == 2


def test_zero_warm_start_equals_the_plain_loop_exactly():
    policy = small_policy(scheduler="ddim", num_inference_steps=6)
    rng = np.random.default_rng(0)

    class ObsEnv(ClockEnv):  # the policy's observation keys, as a function of the tick
        def _obs(self):
            return {"a": np.full(3, self.t * 0.1, np.float32), "b": rng.normal(size=2).astype(np.float32) * 0}

        def reset(self, seed=None):
            super().reset(seed)
            return self._obs(), {}

        def step(self, action):
            _, *rest = super().step(action[:1])
            return (self._obs(), *rest)

    def plain():
        g = torch.Generator().manual_seed(0)
        return lambda obs: policy.predict_action({k: torch.from_numpy(v) for k, v in obs.items()}, g)["action"].numpy()

    def warm(k0):
        g = torch.Generator().manual_seed(0)

        def sample(obs, init, k):
            o = {k_: torch.from_numpy(v) for k_, v in obs.items()}
            return policy.predict_action(o, g, init_action=None if init is None else torch.from_numpy(init),
                                         init_step=k)["action_pred"].numpy()

        return WarmStart(sample, 2, 4, k0)

    def roll(predict):
        envs = [ObsEnv(horizon=20) for _ in range(3)]
        simulate(envs, [0, 1, 2], predict, 2, 4, 20, LoopConfig(mode="offline"))
        return [e.sent for e in envs]

    assert roll(plain()) == roll(warm(0))
    assert roll(warm(3)) != roll(plain())  # a warm start does change the actions (the test can fail)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmsolver", "unipc"])
def test_policy_warm_start_runs_the_last_steps_and_checks_its_guess(sampler):
    policy = small_policy(scheduler=sampler, num_inference_steps=6)
    obs = obs_batch(B=2)
    guess = policy.predict_action(obs, torch.Generator().manual_seed(0))["action_pred"]
    policy.step_cursor = rec = StepRecorder()
    out = policy.predict_action(obs, torch.Generator().manual_seed(1), init_action=guess, init_step=4)
    assert rec.steps == [("session", 6), 4, 5] and torch.isfinite(out["action"]).all()
    with pytest.raises(ValueError, match=r"init_action of shape \(2, 8, 4\)"):
        policy.predict_action(obs, init_action=guess[:, :4], init_step=4)
    with pytest.raises(ValueError, match="init_step must be in"):
        policy.predict_action(obs, init_action=guess, init_step=6)
    bad = guess.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        policy.predict_action(obs, init_action=bad, init_step=2)


def test_cache_engine_under_a_warm_start():
    """Computing everything is exact under a warm start too; a cached schedule computes at the first step run
    (nothing is cached yet) and reuses after it."""
    policy = small_policy(scheduler="ddim", num_inference_steps=8)
    obs = obs_batch(B=2)
    guess = policy.predict_action(obs, torch.Generator().manual_seed(0))["action_pred"]

    def act():
        return policy.predict_action(obs, torch.Generator().manual_seed(3), init_action=guess, init_step=3)["action"]

    ref = act()
    engine = attach(policy.model)
    blocks = [b.name for b in engine.blocks]
    engine.set_schedule(compute_all(blocks, 8))
    policy.step_cursor = engine
    try:
        assert torch.equal(act(), ref)
        engine.set_schedule(uniform(blocks, 8, 2))  # computes at steps 0 and 4 only: step 3 has no cache
        engine.reset_stats(8)
        cached = act()
        computed = np.asarray(engine.computed)  # (blocks, K)
    finally:
        engine.detach()
        policy.step_cursor = None
    assert torch.isfinite(cached).all() and not torch.equal(cached, ref)
    assert computed[:, 3].all() and computed[:, 4].all() and not computed[:, [5, 6, 7]].any()
    assert not computed[:, :3].any()
