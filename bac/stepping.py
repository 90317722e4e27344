"""Reverse steps of DDPM and DDIM as a few tensor ops with per-step coefficients computed once.

A diffusers ``scheduler.step`` recomputes its coefficients, looks up the previous timestep and builds a
return object at every call: about 0.3-0.5 ms of Python per step on a CPU, which is as much as a cached
denoiser step of a small DP-T and so caps the speedup that caching can give. Both schedulers' steps are
affine in the sample, the model output, the clipped x0 prediction and the fresh noise:

    x0     = clip((x_t - b_k * eps) / a_k)
    x_prev = c_k * x0 + d_k * x_t + e_k * eps + s_k * z,   z ~ N(0, I) drawn as diffusers draws it

so ``make_fast_step`` reads a_k .. s_k from the scheduler's own ``alphas_cumprod`` (with its float32
arithmetic), checks the result against ``scheduler.step`` once, and otherwise falls back to it. Supported:
DDPMScheduler (epsilon, fixed_small variance, clip or no clip) and DDIMScheduler (epsilon, eta 0).
"""
from __future__ import annotations

import weakref
from typing import Callable

import torch

FastStep = Callable[[torch.Tensor, int, torch.Tensor, torch.Generator | None], torch.Tensor]


def _draw_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    # As diffusers' randn_tensor: draw on the generator's device, then move.
    device = generator.device if generator is not None else x.device
    z = torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype)
    return z if device == x.device else z.to(x.device)


def _coefficients(scheduler) -> list[tuple] | None:
    cfg = scheduler.config
    name = type(scheduler).__name__
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        return None
    if cfg.prediction_type != "epsilon" or getattr(cfg, "thresholding", False):
        return None
    K = len(scheduler.timesteps)
    one = torch.tensor(1.0)
    coeffs = []
    for k, t in enumerate(scheduler.timesteps.tolist()):
        ap = scheduler.alphas_cumprod[t]
        if name == "DDPMScheduler":
            if cfg.variance_type != "fixed_small":
                return None
            prev_t = scheduler.previous_timestep(t)
            prev_t = int(prev_t) if not torch.is_tensor(prev_t) else int(prev_t.item())
            ap_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else one
            bp, bp_prev = 1 - ap, 1 - ap_prev
            alpha_t = ap / ap_prev
            beta_t = 1 - alpha_t
            c = (ap_prev ** 0.5 * beta_t) / bp
            d = alpha_t ** 0.5 * bp_prev / bp
            s = torch.clamp(bp_prev / bp * beta_t, min=1e-20) ** 0.5 if t > 0 else None
            coeffs.append((bp ** 0.5, ap ** 0.5, c, d, None, s))
        elif name == "DDIMScheduler":
            prev_t = t - cfg.num_train_timesteps // K
            ap_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.final_alpha_cumprod
            coeffs.append(((1 - ap) ** 0.5, ap ** 0.5, ap_prev ** 0.5, None, (1 - ap_prev) ** 0.5, None))
        else:
            return None
    # 0-d float32 CPU tensors: the same float32 bits as a Python number in a tensor op (which is rounded to
    # float32 first), but a Python number is first wrapped as a float64 tensor and converted, which doubles
    # the op's cost at these sizes (2.9 vs 1.4 us). A CPU scalar operand works with CUDA tensors too.
    return [tuple(None if v is None else torch.tensor(float(v), dtype=torch.float32) for v in c) for c in coeffs]


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def fast_step_for(scheduler) -> FastStep | None:
    """``make_fast_step`` memoized per scheduler object and timestep sequence."""
    key = tuple(scheduler.timesteps.tolist())
    hit = _CACHE.get(scheduler)
    if hit is None or hit[0] != key:
        hit = (key, make_fast_step(scheduler))
        _CACHE[scheduler] = hit
    return hit[1]


def make_fast_step(scheduler) -> FastStep | None:
    """After ``scheduler.set_timesteps``: ``step(eps, k, x_t, generator) -> x_prev``, or None if unsupported."""
    coeffs = _coefficients(scheduler)
    if coeffs is None:
        return None
    clip = scheduler.config.clip_sample
    clip_range = getattr(scheduler.config, "clip_sample_range", 1.0)

    def step(eps: torch.Tensor, k: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, a, c, d, e, s = coeffs[k]
        x0 = (x - b * eps) / a
        if clip:
            x0 = x0.clamp(-clip_range, clip_range)
        out = c * x0
        if d is not None:
            out = out + d * x
        if e is not None:
            out = out + e * eps
        if s is not None:
            out = out + s * _draw_noise(x, generator)
        return out

    if not _agrees_with(scheduler, step):
        return None
    return step


def _agrees_with(scheduler, step: FastStep) -> bool:
    """Compare with ``scheduler.step`` on random inputs at the first, a middle and the last step."""
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    K = len(scheduler.timesteps)
    for k in sorted({0, K // 2, K - 1}):
        t = int(scheduler.timesteps[k])  # a plain int: the check runs on the CPU whatever device the timesteps are on
        ref = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(k)).prev_sample
        ours = step(eps, k, x, torch.Generator().manual_seed(k))
        if not torch.allclose(ref, ours, rtol=1e-5, atol=1e-6):
            return False
    return True
