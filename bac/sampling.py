"""The denoising loop shared by every diffusion model of the project (robot policies and DiT backends).

It takes any diffusers-style scheduler (``set_timesteps``, ``timesteps``, ``step(...).prev_sample``) and
announces each step ``(k, t)`` to an optional cursor before the model is called. The cursor is the one
source of truth for "which denoising step is this" that a cache engine reads; no wrapper counts calls.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch


class StepCursor(Protocol):
    """Anything that wants to know the current denoising step (a cache engine, a recorder)."""

    def step(self, k: int, t: torch.Tensor) -> None: ...


def denoise(
    model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    cursor: StepCursor | None = None,
) -> torch.Tensor:
    """Run ``K = num_inference_steps`` reverse steps from ``noise`` and return the clean sample.

    ``model_fn(x_t, t)`` returns the scheduler's model output (e.g. the predicted noise) with x_t's
    shape. ``generator`` drives the scheduler's stochastic steps (DDPM), so a seeded generator makes
    sampling reproducible.
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    x = noise
    for k, t in enumerate(scheduler.timesteps):
        if cursor is not None:
            cursor.step(k, t)
        out = model_fn(x, t)
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
