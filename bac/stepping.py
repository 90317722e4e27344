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

import torch


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
MAX_PREDRAW_BYTES = 2**24  # FastStep.draw_noise draws a whole run's step noise at once up to this size


def fast_step_for(scheduler) -> "FastStep | None":
    """``make_fast_step`` memoized per scheduler object and timestep sequence."""
    key = tuple(scheduler.timesteps.tolist())
    hit = _CACHE.get(scheduler)
    if hit is None or hit[0] != key:
        hit = (key, make_fast_step(scheduler))
        _CACHE[scheduler] = hit
    return hit[1]


def make_fast_step(scheduler) -> "FastStep | None":
    """After ``scheduler.set_timesteps``: ``step(eps, k, x_t, generator) -> x_prev``, or None if unsupported."""
    coeffs = _coefficients(scheduler)
    if coeffs is None:
        return None
    step = FastStep(coeffs, scheduler.config.clip_sample, getattr(scheduler.config, "clip_sample_range", 1.0))
    if not _agrees_with(scheduler, step):
        return None
    return step


class FastStep:
    """One scheduler's reverse steps as tensor ops: ``step(eps, k, x, generator, z=None) -> x_prev``.

    ``z`` is step k's fresh noise when the caller drew it ahead (see :meth:`draw_noise`); otherwise the step
    draws it from ``generator`` as diffusers does.
    """

    def __init__(self, coeffs: list[tuple], clip: bool, clip_range: float):
        self.coeffs, self.clip, self.clip_range = coeffs, clip, clip_range
        self.noisy = [c[5] is not None for c in coeffs]  # the steps that draw fresh noise

    def __call__(self, eps: torch.Tensor, k: int, x: torch.Tensor, generator: torch.Generator | None,
                 z: torch.Tensor | None = None) -> torch.Tensor:
        # The same ops in the same order as the formula above, but in place on the tensors made here
        # (never on x or eps, which the caller and hooks may still hold): an allocation costs as much as
        # the op itself at action-chunk sizes.
        b, a, c, d, e, s = self.coeffs[k]
        out = x - b * eps
        out.div_(a)
        if self.clip:
            out.clamp_(-self.clip_range, self.clip_range)
        out.mul_(c)
        if d is not None:
            out.add_(d * x)
        if e is not None:
            out.add_(e * eps)
        if s is not None:
            out.add_(_draw_noise(x, generator).mul_(s) if z is None else z * s)
        return out

    def draw_noise(self, x: torch.Tensor, generator: torch.Generator | None) -> list[torch.Tensor | None] | None:
        """The fresh noise of every step of a run from ``x`` (the initial sample), drawn in one call instead of
        one per step (a few us each at action-chunk sizes), or None where that would not give the same
        numbers: without an explicit generator (other code may draw from the global one between steps), or
        where one draw of n samples is not n draws in a row (checked once per shape, dtype and device, never
        assumed; a CPU generator fills blocks of 16 numbers, so it holds there for sizes that are multiples of
        16, as every chunk of horizon 16 is). Also None where the draws would take more than
        ``MAX_PREDRAW_BYTES`` (large image or video latents, whose per-step draw costs far more than a call).
        Index the list by step: None at the steps that draw none."""
        n = sum(self.noisy)
        if generator is None or n < 2 or n * x.numel() * x.element_size() > MAX_PREDRAW_BYTES:
            return None
        if not _draws_concatenate(tuple(x.shape), x.dtype, generator.device):
            return None
        zs = iter(torch.randn((n, *x.shape), generator=generator, device=generator.device, dtype=x.dtype)
                  .to(x.device).unbind(0))
        return [next(zs) if noisy else None for noisy in self.noisy]


_CONCAT: dict[tuple, bool] = {}


def _draws_concatenate(shape: tuple, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether one ``randn((3, *shape))`` gives the same numbers as three ``randn(shape)`` in a row."""
    key = (shape, dtype, str(device))
    if key not in _CONCAT:
        g1, g2 = (torch.Generator(device=device).manual_seed(1234) for _ in range(2))
        once = torch.randn((3, *shape), generator=g1, device=device, dtype=dtype)
        each = torch.stack([torch.randn(shape, generator=g2, device=device, dtype=dtype) for _ in range(3)])
        _CONCAT[key] = bool(torch.equal(once, each))
    return _CONCAT[key]


def _agrees_with(scheduler, step: "FastStep") -> bool:
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
