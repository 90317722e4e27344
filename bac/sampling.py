"""The denoising loop shared by every diffusion model of the project (robot policies and DiT backends).

It takes any diffusers-style scheduler (``set_timesteps``, ``timesteps``, ``step(...).prev_sample``), opens
one session of the optional cursor for the whole run and announces each step ``(k, t)`` to it before the
model is called. The cursor (a cache engine, say) thereby has one source of truth for "which denoising
step is this"; no wrapper counts calls, and the session's end (also on an exception) is its reset.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, Protocol

import torch

from bac.stepping import fast_step_for


class StepCursor(Protocol):
    """Anything that follows the denoising steps (a cache engine, a recorder)."""

    def session(self, num_steps: int) -> ContextManager: ...

    def step(self, k: int, t: torch.Tensor) -> None: ...


def denoise(
    model_fn: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    scheduler,
    noise: torch.Tensor,
    num_inference_steps: int,
    generator: torch.Generator | None = None,
    cursor: StepCursor | None = None,
    fast: bool = True,
) -> torch.Tensor:
    """Run ``K = num_inference_steps`` reverse steps from ``noise`` and return the clean sample.

    ``model_fn(x_t, t, k)`` returns the scheduler's model output (e.g. the predicted noise) with x_t's
    shape; ``k`` lets it look up per-step values it precomputed (time embeddings). ``generator`` drives the scheduler's stochastic steps (DDPM), so a seeded generator makes
    sampling reproducible. With ``fast`` (default) DDPM and DDIM steps run as precomputed tensor ops
    (``bac.stepping``), identical to the scheduler's own ``step``; other schedulers use ``step``.
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    fast_step = fast_step_for(scheduler) if fast else None  # DDPM/DDIM as precomputed tensor ops
    x = noise
    timesteps = scheduler.timesteps.unbind(0)  # K 0-d views made at once, not one indexing op per step
    # The steps' fresh noise in one draw where that gives the same numbers (see FastStep.draw_noise);
    # None for a step that draws its own.
    zs = (fast_step.draw_noise(noise, generator) if fast_step is not None else None) or [None] * len(timesteps)
    with cursor.session(len(timesteps)) if cursor is not None else nullcontext():
        for k, t in enumerate(timesteps):
            if cursor is not None:
                cursor.step(k, t)
            out = model_fn(x, t, k)
            if fast_step is not None:
                x = fast_step(out, k, x, generator, zs[k])
            else:
                x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
