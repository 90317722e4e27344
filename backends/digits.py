"""scikit-learn's bundled handwritten digits (1797 images of 8x8, no download), upsampled for the image backends.

A fixed split: a seeded permutation, the last ``test_fraction`` held out (the classifier's test set and the real
images a Fréchet distance compares with)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def load_digits_split(size: int = 16, test_fraction: float = 0.2, seed: int = 0):
    """((x_train, y_train), (x_test, y_test)): x (N, 1, size, size) float32 in [-1, 1], y (N,) int64 in 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float()[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    x = x * 2 - 1
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(len(y) * test_fraction))
    tr, te = perm[:-n_test], perm[-n_test:]
    return (x[tr], y[tr]), (x[te], y[te])
