"""A small CNN digit classifier, trained on the digits the DiT learns, that judges generated images without the
uncached run: accuracy on the class asked for, and a Fréchet distance (FD) between its penultimate features of
generated and of real test images (FID's formula, Heusel et al. 2017, on a 64-d feature space of our own:
comparable between runs of this project, not with published FIDs).

Shapes: x (N, 1, H, W) in [-1, 1]; features (N, F)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ClassifierConfig:
    image_size: int = 16
    width: int = 16
    n_features: int = 64
    n_classes: int = 10

    def __post_init__(self):
        if self.image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4 (two 2x poolings), got {self.image_size}")


class DigitClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.config = c = config
        self.conv = nn.Sequential(
            nn.Conv2d(1, c.width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c.width, 2 * c.width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Linear(2 * c.width * (c.image_size // 4) ** 2, c.n_features)
        self.head = nn.Linear(c.n_features, c.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, F): the penultimate activations (what FD compares)."""
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, n_classes) logits


def train_classifier(x: torch.Tensor, y: torch.Tensor, epochs: int = 30, seed: int = 0, lr: float = 2e-3,
                     batch_size: int = 64) -> DigitClassifier:
    """Adam on (x, y) with small random shifts (generated digits are not centred exactly like the scans)."""
    torch.manual_seed(seed)
    model = DigitClassifier(ClassifierConfig(image_size=x.shape[-1]))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            xb = x[idx]
            dx, dy = torch.randint(-1, 2, (2,), generator=g).tolist()
            xb = torch.roll(xb, shifts=(dx, dy), dims=(-2, -1))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: DigitClassifier, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FD between Gaussians fitted to feature sets a (N, F) and b (M, F):
    |mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2), the trace of the root from symmetric eigenvalues."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cb @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross)


@torch.no_grad()
def feature_fd(model: DigitClassifier, x: torch.Tensor, real: torch.Tensor) -> float:
    """FD between the classifier features of images x and of real images."""
    return frechet_distance(model.features(x).numpy(), model.features(real).numpy())


@torch.no_grad()
def paired_change(model: DigitClassifier, x: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor,
                  real: torch.Tensor, n_boot: int = 200, seed: int = 0) -> dict:
    """How accuracy and FD change from ``ref`` (N, 1, H, W; e.g. uncached) to ``x`` (the same N, e.g. cached from
    identical noise), with standard errors from pairs: accuracy's from the per-image differences, FD's from a
    bootstrap that resamples the same images for both (``n_boot`` resamples). |change| <= 2 se: within noise."""
    hit_x = (model(x).argmax(1) == labels).double()
    hit_r = (model(ref).argmax(1) == labels).double()
    d = hit_x - hit_r
    fx, fr, freal = model.features(x).numpy(), model.features(ref).numpy(), model.features(real).numpy()
    g = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = g.integers(0, len(fx), len(fx))
        boots.append(frechet_distance(fx[i], freal) - frechet_distance(fr[i], freal))
    return {"accuracy": float(d.mean()), "accuracy_se": float(d.std(unbiased=True) / len(d) ** 0.5),
            "fd": frechet_distance(fx, freal) - frechet_distance(fr, freal), "fd_se": float(np.std(boots, ddof=1))}


def save_classifier(model: DigitClassifier, directory: str | Path) -> list[str]:
    """Write ``classifier.safetensors`` and ``classifier.json``; returns the file names (for the manifest)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "classifier.safetensors"))
    (d / "classifier.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    return ["classifier.safetensors", "classifier.json"]


def load_classifier(directory: str | Path) -> DigitClassifier:
    d = Path(directory)
    model = DigitClassifier(ClassifierConfig(**json.loads((d / "classifier.json").read_text())))
    model.load_state_dict(load_file(str(d / "classifier.safetensors")))
    return model.eval()
