"""The same engine and strategies on a CUDA device: exact when told to compute everything, really reusing
otherwise, leaving no trace. Skipped where torch sees no GPU (CI); run with ``pytest -m cuda`` on one."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from policies import load_policy
from policies.cache_target import disable_cache, enable_cache, make_schedule
from tests.test_engine import (act, check_compute_all_and_detach, check_fused_matches_unfused,
                               check_stack_matches_layer_wrappers, make_policy)
from tests.test_strategies import check_compute_everything

DEVICE = os.environ.get("BAC_TEST_DEVICE", "cuda")  # BAC_TEST_DEVICE=cpu checks these tests' own logic anywhere
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                                                   reason="torch sees no CUDA device")]
ROOT = Path(__file__).resolve().parents[1]


def cuda_policy():
    policy = make_policy().to(DEVICE)
    assert policy.device.type == torch.device(DEVICE).type
    return policy


def test_compute_all_is_bitwise_identical_and_detach_restores_on_cuda():
    check_compute_all_and_detach(cuda_policy())


@pytest.mark.parametrize("name", ["mask+taylor", "mask+foca", "teacache", "fbcache", "bwcache", "toca", "fora",
                                  "delta_dit", "profiling"])
def test_every_strategy_computing_everything_is_exact_on_cuda(name):
    check_compute_everything(cuda_policy(), name)


def test_uniform_reuse_fused_and_unfused_agree_on_cuda():
    check_fused_matches_unfused(cuda_policy())


def test_engine_run_stack_is_bitwise_the_layer_path_on_cuda():
    check_stack_matches_layer_wrappers(cuda_policy())


def test_shipped_lift_policy_with_bac_on_cuda():
    """The shipped schedule (made on CPU) runs on the GPU: the same mask, under a quarter of the FLOPs, actions near uncached."""
    checkpoint = ROOT / "checkpoints" / "lift"
    policy = load_policy(checkpoint, DEVICE)
    o = {k: torch.randn(4, 2, d, generator=torch.Generator().manual_seed(1)).to(DEVICE)
         for k, d in zip(policy.config.obs_keys, policy.config.obs_dims)}
    reference = act(policy, o)
    schedule = make_schedule(policy, checkpoint, "bac", n_updates=10, n_bubble=1)
    engine = enable_cache(policy, schedule)
    try:
        cached = act(policy, o)
        assert int(engine.computed.sum()) == int(schedule.to_mask().sum())
        assert engine.flops_ratio() < 0.25
    finally:
        disable_cache(policy, engine)
    spread = (act(policy, o, seed=1) - reference).pow(2).mean()  # another noise draw, uncached
    assert torch.isfinite(cached).all() and (cached - reference).pow(2).mean() < spread
