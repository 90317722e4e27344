"""The precomputed DDPM/DDIM steps are the schedulers' own steps, bit for bit."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

from bac.sampling import denoise
from bac.stepping import make_fast_step


@pytest.mark.parametrize("cls,K,clip,shape", [(DDPMScheduler, 100, True, (2, 16, 7)), (DDPMScheduler, 50, False, (2, 16, 7)),
                                              (DDPMScheduler, 20, True, (1, 3, 5)),  # 15 numbers: drawn per step
                                              (DDIMScheduler, 10, True, (2, 16, 7)), (DDIMScheduler, 100, True, (2, 16, 7))])
def test_fast_denoise_equals_scheduler_step(cls, K, clip, shape):
    sched = cls(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=clip)
    noise = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    model = lambda x, t, k: torch.sin(3 * x + 0.01 * t)  # noqa: E731
    out = [denoise(model, sched, noise, K, generator=torch.Generator().manual_seed(1), fast=f) for f in (True, False)]
    assert torch.equal(out[0], out[1])


def test_unsupported_scheduler_falls_back():
    sched = EulerDiscreteScheduler(num_train_timesteps=100)
    sched.set_timesteps(10)
    assert make_fast_step(sched) is None
    x = denoise(lambda x, t, k: 0.1 * x, sched, torch.ones(1, 2, 2), 10)
    assert torch.isfinite(x).all()


def test_step_noise_is_drawn_at_once_only_where_that_changes_nothing():
    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    sched.set_timesteps(10)
    step = make_fast_step(sched)
    g = torch.Generator().manual_seed(3)
    zs = step.draw_noise(torch.zeros(2, 16, 7), g)  # 224 numbers: one CPU draw is the per-step draws in a row
    assert [z is None for z in zs] == [False] * 9 + [True]  # the last DDPM step adds no noise
    g2 = torch.Generator().manual_seed(3)
    assert all(torch.equal(z, torch.randn(2, 16, 7, generator=g2)) for z in zs[:-1])
    assert step.draw_noise(torch.zeros(1, 3, 5), g) is None  # 15 numbers: the draws would differ
    assert step.draw_noise(torch.zeros(2, 16, 7), None) is None  # the global generator: other code may draw
    assert step.draw_noise(torch.zeros(1, 16, 2**15), g) is None  # 9 draws of 2 MB: over MAX_PREDRAW_BYTES


def test_step_leaves_its_inputs_alone():
    sched = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2")
    sched.set_timesteps(10)
    step = make_fast_step(sched)
    x, eps = torch.randn(2, 16, 7), torch.randn(2, 16, 7)
    x0, eps0 = x.clone(), eps.clone()
    for k in range(10):
        step(eps, k, x, torch.Generator().manual_seed(k))
    assert torch.equal(x, x0) and torch.equal(eps, eps0)
