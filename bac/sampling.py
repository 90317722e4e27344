"""The denoising loop shared by every diffusion model of the project (robot policies and DiT backends).

It takes any diffusers-style scheduler (``set_timesteps``, ``timesteps``, ``step(...).prev_sample``), opens
one session of the optional cursor for the whole run and announces each step ``(k, t)`` to it before the
model is called. The cursor (a cache engine, say) thereby has one source of truth for "which denoising
step is this"; no wrapper counts calls, and the session's end (also on an exception) is its reset.
"""
from __future__ import annotations

import inspect
from contextlib import nullcontext
from functools import lru_cache
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
    start: int = 0,
) -> torch.Tensor:
    """Run ``K = num_inference_steps`` reverse steps from ``noise`` and return the clean sample.

    With ``start`` = k0 > 0, ``noise`` is a sample already at step k0's noise level (a warm start, e.g. the
    previous action chunk re-noised) and only steps k0 .. K-1 run; the cursor's session still spans K steps and
    is told each step's index k in that range, so a K-step cache schedule applies as it is (a block that has
    nothing cached yet computes).

    ``model_fn(x_t, t, k)`` returns the scheduler's model output (e.g. the predicted noise) with x_t's
    shape; ``k`` lets it look up per-step values it precomputed (time embeddings). ``generator`` drives the scheduler's stochastic steps (DDPM), so a seeded generator makes
    sampling reproducible. With ``fast`` (default) DDPM and DDIM steps run as precomputed tensor ops
    (``bac.stepping``), identical to the scheduler's own ``step``; other schedulers use ``step``.
    """
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    if not 0 <= start < len(scheduler.timesteps):
        raise ValueError(f"start step {start} is outside [0, {len(scheduler.timesteps)})")
    fast_step = fast_step_for(scheduler) if fast else None  # DDPM/DDIM as precomputed tensor ops
    # Deterministic solvers (UniPC) take no generator; the stochastic ones draw their noise from it.
    step_kwargs = {"generator": generator} if _step_takes_generator(type(scheduler)) else {}
    x = noise
    timesteps = scheduler.timesteps.unbind(0)  # K 0-d views made at once, not one indexing op per step
    # The steps' fresh noise in one draw where that gives the same numbers (see FastStep.draw_noise);
    # None for a step that draws its own.
    zs = (fast_step.draw_noise(noise, generator) if fast_step is not None else None) or [None] * len(timesteps)
    with cursor.session(len(timesteps)) if cursor is not None else nullcontext():
        for k, t in enumerate(timesteps[start:], start):  # a warm start skips steps 0 .. start-1
            if cursor is not None:
                cursor.step(k, t)
            out = model_fn(x, t, k)
            if fast_step is not None:
                x = fast_step(out, k, x, generator, zs[k])
            else:
                x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


@lru_cache(maxsize=None)
def _step_takes_generator(scheduler_cls: type) -> bool:
    return "generator" in inspect.signature(scheduler_cls.step).parameters
