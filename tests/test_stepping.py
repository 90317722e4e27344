"""The precomputed DDPM/DDIM steps are the schedulers' own steps, bit for bit."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from bac.sampling import denoise
from bac.stepping import make_fast_step


@pytest.mark.parametrize("cls,K,clip", [(DDPMScheduler, 100, True), (DDPMScheduler, 50, False),
                                        (DDIMScheduler, 10, True), (DDIMScheduler, 100, True)])
def test_fast_denoise_equals_scheduler_step(cls, K, clip):
    sched = cls(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=clip)
    noise = torch.randn(2, 16, 7, generator=torch.Generator().manual_seed(0))
    model = lambda x, t, k: torch.sin(3 * x + 0.01 * t)  # noqa: E731
    out = [denoise(model, sched, noise, K, generator=torch.Generator().manual_seed(1), fast=f) for f in (True, False)]
    assert torch.equal(out[0], out[1])


def test_unsupported_scheduler_falls_back():
    sched = EulerDiscreteScheduler(num_train_timesteps=100)
    sched.set_timesteps(10)
    assert make_fast_step(sched) is None
    x = denoise(lambda x, t, k: 0.1 * x, sched, torch.ones(1, 2, 2), 10)
    assert torch.isfinite(x).all()
