"""Clips of moving digits made from scikit-learn's bundled digits (no download): each clip one digit, upsampled
to ``digit`` pixels, pasted on a dark ``canvas`` and moved at a constant integer velocity, bouncing off the
edges. The motion is drawn from a generator, so training sees fresh clips every batch and evaluation fixed ones.

Shapes: clips (N, 1, F, S, S) in [-1, 1] (S = canvas, F = frames); digits (N, 1, D, D) in [-1, 1] (D = digit).
"""
from __future__ import annotations

import torch

from backends.digits import load_digits_split


def _bounce(p0: torch.Tensor, v: torch.Tensor, frames: int, span: int) -> torch.Tensor:
    """Positions (N, F) in [0, span] of points starting at p0 (N,) with velocity v (N,), reflected at 0 and span."""
    p = p0[:, None] + v[:, None] * torch.arange(frames)[None]  # (N, F), unfolded
    if span == 0:
        return torch.zeros_like(p)
    p = p % (2 * span)
    return torch.where(p > span, 2 * span - p, p)


def make_clips(digits: torch.Tensor, frames: int, canvas: int, generator: torch.Generator,
               max_speed: int = 2) -> torch.Tensor:
    """Clips (N, 1, F, S, S) of ``digits`` (N, 1, D, D) moving on an S x S canvas: start anywhere, velocity per axis
    in [-max_speed, max_speed] (not both zero), bouncing."""
    n, _, d, _ = digits.shape
    span = canvas - d
    if span < 0:
        raise ValueError(f"a {d}-pixel digit does not fit a {canvas}-pixel canvas")
    start = torch.randint(0, span + 1, (2, n), generator=generator)
    v = torch.randint(-max_speed, max_speed + 1, (2, n), generator=generator)
    still = (v == 0).all(0)
    v[0, still] = 1  # every clip moves
    ys, xs = _bounce(start[0], v[0], frames, span), _bounce(start[1], v[1], frames, span)  # (N, F)
    clips = torch.full((n, 1, frames, canvas, canvas), -1.0)
    for f in range(frames):
        for i in range(n):
            y, x = int(ys[i, f]), int(xs[i, f])
            clips[i, 0, f, y:y + d, x:x + d] = digits[i, 0]
    return clips


def load_clip_split(digit: int = 8, canvas: int = 16, frames: int = 8, seed: int = 0):
    """Fixed clips of the train and test digits (the split of ``backends.digits``), motion seeded:
    ((train clips, labels), (test clips, labels)); the FD's real data."""
    (x_tr, y_tr), (x_te, y_te) = load_digits_split(digit)
    g = torch.Generator().manual_seed(seed)
    return (make_clips(x_tr, frames, canvas, g), y_tr), (make_clips(x_te, frames, canvas, g), y_te)
