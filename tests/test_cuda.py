"""The same engine and strategies on a CUDA device: exact when told to compute everything, really reusing
otherwise, leaving no trace. Skipped where torch sees no GPU (CI); run with ``pytest -m cuda`` on one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bac.engine import attach, find_blocks
from bac.schedule import uniform
from policies import load_policy
from policies.caching import disable_cache, enable_cache, make_schedule, policy_signature
from tests.test_engine import make_policy, obs
from tests.test_strategies import compute_everything

DEVICE = os.environ.get("BAC_TEST_DEVICE", "cuda")  # BAC_TEST_DEVICE=cpu checks these tests' own logic anywhere
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                   reason="torch sees no CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


def cuda_act(policy, o, seed=0):
    gen = torch.Generator(policy.device).manual_seed(seed)  # the noise is drawn on the policy's device
    return policy.predict_action(o, generator=gen)["action"]


def cuda_policy():
    return make_policy().to(DEVICE)


def test_compute_all_is_bitwise_identical_and_detach_restores_on_cuda():
    policy = cuda_policy()
    before = {k: v.clone() for k, v in policy.state_dict().items()}
    reference = cuda_act(policy, obs())
    assert reference.device.type == torch.device(DEVICE).type
    engine = attach(policy.model)
    policy.step_cursor = engine
    assert torch.equal(cuda_act(policy, obs()), reference)
    assert engine.computed.sum() == 9 * 20 and engine.reused.sum() == 0
    engine.detach()
    policy.step_cursor = None
    assert all(torch.equal(before[k], v) for k, v in policy.state_dict().items())
    assert torch.equal(cuda_act(policy, obs()), reference)


@pytest.mark.parametrize("name", ["mask+taylor", "mask+foca", "teacache", "fbcache", "bwcache", "toca", "fora",
                                  "delta_dit", "profiling"])
def test_every_strategy_computing_everything_is_exact_on_cuda(name):
    policy = cuda_policy()
    reference = cuda_act(policy, obs())
    engine = attach(policy.model, compute_everything(policy)[name])
    policy.step_cursor = engine
    try:
        assert torch.equal(cuda_act(policy, obs()), reference)
        assert engine.reused.sum() == 0
    finally:
        engine.detach()
        policy.step_cursor = None


def test_uniform_reuse_fused_and_unfused_agree_on_cuda():
    policy = cuda_policy()
    scheduler, K, model_hash = policy_signature(policy)
    blocks = [info.name for _, _, info in find_blocks(policy.model)]
    schedule = uniform(blocks, K, 4, scheduler=scheduler, model_hash=model_hash)
    outs = {}
    for fuse in (True, False):
        engine = attach(policy.model, schedule, fuse_layers=fuse)
        policy.step_cursor = engine
        outs[fuse] = cuda_act(policy, obs())
        assert engine.reused.sum() == 9 * 16 and engine.computed.sum() == 9 * 4
        engine.detach()
        policy.step_cursor = None
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)


def test_shipped_lift_policy_with_bac_on_cuda():
    """The shipped schedule (made on CPU) runs on the GPU: same mask, same FLOPs ratio, actions near uncached."""
    checkpoint = ROOT / "checkpoints" / "lift"
    policy = load_policy(checkpoint, DEVICE)
    o = {k: torch.randn(4, 2, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
         for k, d in zip(policy.config.obs_keys, policy.config.obs_dims)}
    reference = cuda_act(policy, o)
    schedule = make_schedule(policy, checkpoint, "bac", n_updates=10, n_bubble=1)
    engine = enable_cache(policy, schedule)
    try:
        cached = cuda_act(policy, o)
        assert int(engine.computed.sum()) == int(schedule.to_mask().sum())
        assert engine.flops_ratio() < 0.25
    finally:
        disable_cache(policy, engine)
    spread = (cuda_act(policy, o, seed=1) - reference).pow(2).mean()  # another noise draw, uncached
    assert torch.isfinite(cached).all() and (cached - reference).pow(2).mean() < spread
