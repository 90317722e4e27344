"""Output-weighted ACS (bac/sensitivity.py, ``cache.weights=output``): the weights are measured from real reuses,
they move ACS's updates away from steps whose drift does not reach the output, and a target that cannot return
its output is told so."""
from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from bac.blocks import BlockInfo  # noqa: E402
from bac.calibration import Calibration  # noqa: E402
from bac.methods import CacheContext, build_cache, defaults  # noqa: E402
from bac.sensitivity import measure_step_weights  # noqa: E402
from backends.dit_image import DiTImageConfig, DiTImageGenerator  # noqa: E402
from backends.generator import GeneratorCacheTarget  # noqa: E402

K = 8


@pytest.fixture(scope="module")
def target():
    torch.manual_seed(0)
    gen = DiTImageGenerator(DiTImageConfig(image_size=8, patch_size=2, num_layers=2, num_heads=2, head_dim=8,
                                           num_inference_steps=K))
    with torch.no_grad():
        for p in gen.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return GeneratorCacheTarget(gen)


def test_weights_are_measured_and_change_the_schedule(target):
    ctx = CacheContext(target, calibration_inputs=2)
    w = measure_step_weights(target, ctx.calibration(), n=2)
    assert w.shape == (K,) and np.isfinite(w).all() and (w > 0).all() and w.mean() == pytest.approx(1.0)
    assert w[0] == w[1]
    again = measure_step_weights(target, ctx.calibration(), n=2)
    assert np.array_equal(w, again)  # deterministic (same seed, same reuses)
    sched = build_cache(ctx, {**defaults("blockwise_acs"), "n_updates": 3, "weights": "output"})
    assert sched.calibration["step_weights"] == [round(float(x), 4) for x in ctx.step_weights()]
    with pytest.raises(ValueError, match="cache.weights='loss' is not one of"):
        build_cache(ctx, {**defaults("bac"), "weights": "loss"})


def test_weighting_moves_updates_to_the_steps_that_matter():
    blocks = [BlockInfo("b0", 0, "block")]
    K2 = 10
    # drift grows toward the end: unweighted ACS spends its updates there
    x = np.cumsum(np.r_[np.full(6, 0.05), np.full(4, 0.6)])
    feats = np.stack([np.cos(x), np.sin(x)], 1)
    sim = feats @ feats.T  # (K, K) cosine of unit vectors
    cal = Calibration(blocks, K2, {"cosine": sim[None]}, np.array([1.0]))
    plain = cal.schedule("unified_acs", 3).steps["b0"]
    assert max(s for s in plain if s != K2 - 1) >= 6
    late_blind = np.r_[np.ones(6), np.full(4, 1e-3)]  # the last steps' drift never reaches the output
    weighted = cal.schedule("unified_acs", 3, step_weights=late_blind).steps["b0"]
    assert all(s < 6 for s in weighted if s != K2 - 1) and weighted != plain
    with pytest.raises(ValueError, match="step_weights must be 10 finite non-negative"):
        cal.schedule("bac", 3, step_weights=np.ones(4))


def test_a_target_that_returns_nothing_is_named(target):
    class Silent(GeneratorCacheTarget):
        def cache_sample(self, cursor, n, seed):
            super().cache_sample(cursor, n, seed)

    silent = Silent(target.gen)
    with pytest.raises(TypeError, match="Silent.cache_sample must return its final output"):
        measure_step_weights(silent, CacheContext(silent, 2).calibration(), n=1)
