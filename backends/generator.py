"""What the image and the video DiT backends share: a label-conditioned denoiser driven by a diffusers scheduler
(classifier-free guidance as one batched call), its checkpoint folder, and its ``bac.protocol.CacheTarget``.

A backend subclasses ``Generator`` and says three things: the model it builds from its config (an ``nn.Module``
called as ``model(x_t, timestep=t, class_labels=labels, return_dict=False)[0]`` -> the predicted noise), the
shape of one sample, and how a sample is seen as images (``as_images``: a video's frames), which the digit
classifier and the full-reference metrics read.

Shapes: B samples; one sample is ``sample_shape`` ((C, H, W) for images, (C, F, H, W) for video); K steps.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bac.blocks import BlockSpec
from bac.calibration import Calibration, calibrate
from bac.engine import fingerprint
from bac.protocol import Signature, blocks_of
from bac.sampling import StepCursor, denoise
from backends.checkpoint import verify_manifest, write_manifest

SCHEDULERS = ("ddim", "ddpm")
INFERENCE_FIELDS = ("scheduler", "num_inference_steps", "guidance_scale")  # load-time options, not in config.json


@dataclass(frozen=True)
class GeneratorConfig:
    """What every generator config holds besides its architecture: the classes, the training noise schedule, and
    the inference options (``INFERENCE_FIELDS``: not saved in config.json, given at load time). A backend's
    config subclasses it (frozen too) and calls ``super().__post_init__()``."""

    num_classes: int = 10
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    # inference options
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 1.0

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not known; known: {list(SCHEDULERS)}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {self.num_inference_steps}")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {self.guidance_scale}")


def make_scheduler(config, kind: str | None = None):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind or config.scheduler]
    return cls(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
               prediction_type="epsilon", clip_sample=True)


class Generator:
    """A class-conditional epsilon-predicting DiT. Subclasses set ``Config`` (a ``GeneratorConfig``) and implement
    ``build``, ``sample_shape`` and, for non-image samples, ``as_images``."""

    Config: type

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.model = self.build(self.config).eval()
        self.scheduler = make_scheduler(self.config)

    def build(self, config) -> nn.Module:
        raise NotImplementedError

    @property
    def sample_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def unit_blocks(self) -> list[BlockSpec]:
        """The transformer blocks as whole units (``BlockSpec(kind="block")``): a reused block skips its
        attention, its MLP and its adaLN conditioning, and adds its cached residual."""
        raise NotImplementedError

    def as_images(self, x: torch.Tensor) -> torch.Tensor:
        """Samples (B, *sample_shape) -> images (N, C, H, W) for the classifier and the image metrics."""
        return x

    def image_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The class of each image of ``as_images`` (one per sample for images)."""
        return labels

    def digits_split(self):
        """The digits this backend learns from, at the size its samples hold them: ((x, y), (x_test, y_test))."""
        raise NotImplementedError

    def training_batch(self, digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training samples (N, *sample_shape) made from digit images (N, 1, D, D)."""
        return digits

    def real_split(self):
        """Real samples, fixed: ((train, y), (test, y)); the Fréchet distance's reference."""
        return self.digits_split()

    @property
    def null_class(self) -> int:
        return self.config.num_classes  # the label table's last row: the unconditional class (CFG)

    def predict(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The predicted noise for x_t (B, *sample_shape) at timesteps t (B,) and ``labels`` (B,)."""
        return self.model(x, timestep=t, class_labels=labels, return_dict=False)[0]

    def denoiser(self, labels: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        """``model_fn(x_t, t, k)`` for ``bac.sampling.denoise``: the predicted noise for ``labels`` (B,)."""
        w = self.config.guidance_scale
        if w == 1:
            return lambda x, t, k: self.predict(x, t.reshape(1).expand(len(x)), labels)
        both = torch.cat([labels, torch.full_like(labels, self.null_class)])

        def guided(x, t, k):  # one batched call: conditional and unconditional halves share one cache step
            cond, uncond = self.predict(torch.cat([x, x]), t.reshape(1).expand(2 * len(x)), both).chunk(2)
            return uncond + w * (cond - uncond)

        return guided

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.randn(n, *self.sample_shape, generator=generator)  # CPU-drawn: the same on every device
        return x.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device):
        self.model.to(device)
        return self

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, num_inference_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               cursor: StepCursor | None = None) -> torch.Tensor:
        """K denoising steps (the config's unless given) for ``labels`` (B,) from ``noise`` (B, *sample_shape;
        drawn from ``generator`` if None), each step announced to ``cursor``; returns samples in [-1, 1]."""
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        x = self.noise(len(labels), generator) if noise is None else noise.to(self.device)
        K = num_inference_steps or self.config.num_inference_steps
        return denoise(self.denoiser(labels), self.scheduler, x, K, generator=generator, cursor=cursor).clamp(-1, 1)


def save_generator(gen: Generator, directory: str | Path, record: dict | None = None,
                   extra_files: tuple[str, ...] = ()) -> None:
    """Write model.safetensors, config.json (the fields that define what the weights compute), train_record.json,
    and manifest.json with the sha256 of the weights, the config and ``extra_files`` (e.g. the classifier)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in gen.model.state_dict().items()}, str(d / "model.safetensors"))
    cfg = {k: v for k, v in asdict(gen.config).items() if k not in INFERENCE_FIELDS}
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if record is not None:
        (d / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    write_manifest(d, ["model.safetensors", "config.json", *extra_files])


def load_generator(cls: type[Generator], directory: str | Path, trainer: str, **overrides) -> Generator:
    """Load a checkpoint folder of ``cls`` (sha256 checked against manifest.json); ``overrides`` set inference
    options (None keeps the default); ``trainer`` is the command named when files are missing."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in ("model.safetensors", "config.json"):
        if not (d / name).exists():
            raise FileNotFoundError(f"checkpoint file {d / name} is missing; train one with `{trainer} --out {d}`")
    verify_manifest(d)
    bad = sorted(set(overrides) - set(INFERENCE_FIELDS))
    if bad:
        raise ValueError(f"{bad} cannot be overridden at load time; inference options: {list(INFERENCE_FIELDS)}")
    cfg = json.loads((d / "config.json").read_text())
    known = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{d / 'config.json'} holds {unknown}, which {cls.Config.__name__} does not know: "
                         f"a checkpoint of another backend?")
    gen = cls(cls.Config(**cfg, **{k: v for k, v in overrides.items() if v is not None}))
    gen.model.load_state_dict(load_file(str(d / "model.safetensors")))
    return gen


def calibration_path(checkpoint: str | Path, scheduler: str, num_steps: int, n: int, blocks: str) -> Path:
    return Path(checkpoint) / "calibration" / f"{scheduler}_K{num_steps}_n{n}_{blocks}.npz"


BLOCK_GRANULARITIES = ("units", "branches")


class GeneratorCacheTarget:
    """``gen`` as ``bac.protocol.CacheTarget``. ``blocks``: what the engine caches, ``"units"`` (whole transformer
    blocks, ``Generator.unit_blocks``) or ``"branches"`` (attention and MLP branches: the model's declaration or
    bac's default patterns; the blocks' adaLN conditioning and gates then run every step).
    Calibration inputs are labels 0, 1, ... (cycling over the classes) with seeded noise. With ``checkpoint``,
    ``cache_calibration`` loads ``calibration/<scheduler>_K<K>_n<n>_<blocks>.npz`` there, making and saving it on
    first use; without, bac calibrates in memory each time."""

    def __init__(self, gen: Generator, checkpoint: str | Path | None = None, n_calibration: int = 16,
                 blocks: str = "units"):
        if blocks not in BLOCK_GRANULARITIES:
            raise ValueError(f"blocks={blocks!r} is not known; known: {list(BLOCK_GRANULARITIES)}")
        self.gen, self.checkpoint, self.n_calibration, self.blocks = gen, checkpoint, n_calibration, blocks
        if blocks == "units":
            self.cache_blocks = gen.unit_blocks()
        if checkpoint is None:
            self.cache_calibration = self.cache_step_weights = None  # CacheContext then measures with its own n

    def cache_model(self) -> nn.Module:
        return self.gen.model

    def cache_signature(self) -> Signature:
        return Signature(type(self.gen.scheduler).__name__, self.gen.config.num_inference_steps,
                         fingerprint(self.gen.model))

    def cache_call(self) -> Callable[[], object]:
        """One denoiser call as sampling makes it at batch 1 (zeros, label 0, mid timestep)."""
        gen = self.gen
        x = gen.noise(1) * 0
        model_fn = gen.denoiser(torch.zeros(1, dtype=torch.long, device=gen.device))
        t = torch.tensor(gen.config.num_train_timesteps // 2, device=gen.device)
        return lambda: model_fn(x, t, 0)

    def cache_sample(self, cursor: StepCursor | None, n: int, seed: int) -> torch.Tensor:
        labels = torch.arange(n) % self.gen.config.num_classes
        return self.gen.sample(labels, generator=torch.Generator().manual_seed(seed), cursor=cursor)

    def cache_step_weights(self) -> np.ndarray:
        """``bac.sensitivity``'s step weights, saved beside the calibration (``..._weights.npy``) on first use."""
        from bac.sensitivity import measure_step_weights

        cal, sig = self.cache_calibration(), self.cache_signature()
        path = calibration_path(self.checkpoint, sig.scheduler, sig.num_steps, self.n_calibration, self.blocks)
        path = path.with_name(path.stem + "_weights.npz")
        if path.exists():
            with np.load(path) as z:
                if str(z["model_hash"]) == sig.model_hash and len(z["w"]) == sig.num_steps:
                    return z["w"]
        w = measure_step_weights(self, cal, min(4, self.n_calibration))
        np.savez(path, w=w, model_hash=np.array(sig.model_hash))
        return w

    def cache_calibration(self) -> Calibration:
        sig = self.cache_signature()
        path = calibration_path(self.checkpoint, sig.scheduler, sig.num_steps, self.n_calibration, self.blocks)
        if path.exists():
            cal = Calibration.load(path)
            if (cal.model_hash, cal.num_steps) == (sig.model_hash, sig.num_steps) and \
                    [b.name for b in cal.blocks] == [b.name for b in blocks_of(self)]:
                return cal
        cal = calibrate(self, self.n_calibration, source={"inputs": "labels 0..9 cycling, seeded noise",
                                                          "n": self.n_calibration, "seed": 0})
        cal.save(path)
        return cal
