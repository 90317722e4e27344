"""Full-reference image quality of a cached sample against the uncached one from identical noise.

Images (N, C, H, W) in [-1, 1], compared in [0, 1] (data range 1). PSNR and SSIM are averaged over the N
images; SSIM is Wang et al. 2004 with a Gaussian window (sigma 1.5), shrunk to fit small images."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _unit(x: torch.Tensor) -> torch.Tensor:
    return (x.double() + 1) / 2


def psnr(x: torch.Tensor, ref: torch.Tensor, max_db: float = 100.0) -> float:
    """Mean per-image PSNR in dB (identical images count as ``max_db``)."""
    mse = ((_unit(x) - _unit(ref)) ** 2).flatten(1).mean(1)
    return float((10 * torch.log10(1 / mse.clamp_min(10 ** (-max_db / 10)))).mean())


def rel_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| over the whole batch, on the [-1, 1] values."""
    return float((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-12))


def ssim(x: torch.Tensor, ref: torch.Tensor, sigma: float = 1.5) -> float:
    """Mean SSIM (per channel, valid-window means)."""
    a, b = _unit(x), _unit(ref)
    size = min(11, a.shape[-1], a.shape[-2])
    size -= 1 - size % 2  # odd
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    w = (g[:, None] * g[None, :] / g.sum() ** 2)[None, None].repeat(a.shape[1], 1, 1, 1)  # (C, 1, s, s)
    conv = lambda z: F.conv2d(z, w, groups=a.shape[1])  # noqa: E731
    mu_a, mu_b = conv(a), conv(b)
    var_a, var_b, cov = conv(a * a) - mu_a**2, conv(b * b) - mu_b**2, conv(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(s.flatten(1).mean(1).mean())
