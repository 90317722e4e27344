"""A class-conditional image DiT (diffusers ``DiTTransformer2DModel`` in pixel space) on the cache engine.

    gen = load_dit_image("checkpoints/dit_image", num_inference_steps=50)
    target = DiTCacheTarget(gen, "checkpoints/dit_image")        # a bac.protocol.CacheTarget
    engine = bac.protocol.attach_to(target, bac.methods.build_cache(target, {"name": "bac", "n_updates": 10}))
    images = gen.sample(labels, noise=noise, cursor=engine)      # (B, 1, H, W) in [-1, 1]

The denoiser predicts the noise (epsilon); a diffusers DDIM (deterministic, default) or DDPM scheduler drives
``bac.sampling.denoise``. Classifier-free guidance (``guidance_scale`` > 1; the label table's last row is the
null class, dropped at 10% in training by diffusers' label embedding) runs conditional and unconditional
halves as one batched call, so the engine keeps one cache per step.

Shapes: B images, H = W = image_size, K denoising steps.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch

from bac.calibration import Calibration, calibrate
from bac.engine import fingerprint
from bac.protocol import Signature
from bac.sampling import StepCursor, denoise
from backends.checkpoint import verify_manifest, write_manifest

SCHEDULERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class DiTImageConfig:
    """What the weights compute (saved in config.json); ``scheduler``, ``num_inference_steps`` and
    ``guidance_scale`` are inference options, given at load time."""

    image_size: int = 16
    in_channels: int = 1
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32
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
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {self.num_inference_steps}")
        if self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1: no guidance), got {self.guidance_scale}")


INFERENCE_FIELDS = ("scheduler", "num_inference_steps", "guidance_scale")


def make_scheduler(config: DiTImageConfig, kind: str | None = None):
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}[kind or config.scheduler]
    return cls(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
               prediction_type="epsilon", clip_sample=True)


class DiTImageGenerator:
    def __init__(self, config: DiTImageConfig = DiTImageConfig()):
        from diffusers import DiTTransformer2DModel

        self.config = c = config
        self.model = DiTTransformer2DModel(
            num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
            num_layers=c.num_layers, sample_size=c.image_size, patch_size=c.patch_size,
            num_embeds_ada_norm=c.num_classes,  # label table num_classes + 1: the last row is the null class
        ).eval()
        self.scheduler = make_scheduler(c)

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def denoiser(self, labels: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        """``model_fn(x_t, t, k)`` for ``bac.sampling.denoise``: the predicted noise (B, C, H, W) for ``labels`` (B,)."""
        model, w = self.model, self.config.guidance_scale
        if w == 1:
            return lambda x, t, k: model(x, timestep=t.reshape(1).expand(len(x)), class_labels=labels,
                                         return_dict=False)[0]
        both = torch.cat([labels, torch.full_like(labels, self.null_class)])

        def guided(x, t, k):  # one batched call: conditional and unconditional halves
            eps = model(torch.cat([x, x]), timestep=t.reshape(1).expand(2 * len(x)), class_labels=both,
                        return_dict=False)[0]
            cond, uncond = eps.chunk(2)
            return uncond + w * (cond - uncond)

        return guided

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        x = torch.randn(n, c.in_channels, c.image_size, c.image_size, generator=generator)  # (B, C, H, W), CPU-drawn
        return x.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> "DiTImageGenerator":
        self.model.to(device)
        return self

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, num_inference_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               cursor: StepCursor | None = None) -> torch.Tensor:
        """K denoising steps (the config's unless given) for ``labels`` (B,) from ``noise`` (B, C, H, W; drawn
        from ``generator`` if None), each step announced to ``cursor``; returns (B, C, H, W) in [-1, 1]."""
        labels = torch.as_tensor(labels, dtype=torch.long).to(self.device)
        x = self.noise(len(labels), generator) if noise is None else noise.to(self.device)
        K = num_inference_steps or self.config.num_inference_steps
        out = denoise(self.denoiser(labels), self.scheduler, x, K, generator=generator, cursor=cursor)
        return out.clamp(-1, 1)


def save_dit_image(gen: DiTImageGenerator, directory: str | Path, record: dict | None = None,
                   extra_files: tuple[str, ...] = ()) -> None:
    """Write model.safetensors, config.json (the function-defining fields), train_record.json, and manifest.json
    with the sha256 of the weights, the config and ``extra_files`` (e.g. the classifier saved beside it)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in gen.model.state_dict().items()}, str(d / "model.safetensors"))
    cfg = {k: v for k, v in asdict(gen.config).items() if k not in INFERENCE_FIELDS}
    (d / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if record is not None:
        (d / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    write_manifest(d, ["model.safetensors", "config.json", *extra_files])


def load_dit_image(directory: str | Path, **overrides) -> DiTImageGenerator:
    """Load a checkpoint folder (sha256 checked against manifest.json); ``overrides`` set inference options
    (``scheduler``, ``num_inference_steps``, ``guidance_scale``); None keeps the default."""
    from safetensors.torch import load_file

    d = Path(directory)
    for name in ("model.safetensors", "config.json"):
        if not (d / name).exists():
            raise FileNotFoundError(f"checkpoint file {d / name} is missing; train one with "
                                    f"`python eval/train_dit.py --out {d}`")
    verify_manifest(d)
    cfg = json.loads((d / "config.json").read_text())
    bad = sorted(set(overrides) - set(INFERENCE_FIELDS))
    if bad:
        raise ValueError(f"{bad} cannot be overridden at load time; inference options: {list(INFERENCE_FIELDS)}")
    known = {f.name for f in fields(DiTImageConfig)}
    gen = DiTImageGenerator(DiTImageConfig(**{k: v for k, v in cfg.items() if k in known},
                                           **{k: v for k, v in overrides.items() if v is not None}))
    gen.model.load_state_dict(load_file(str(d / "model.safetensors")))
    return gen


def calibration_path(checkpoint: str | Path, scheduler: str, num_steps: int, n: int) -> Path:
    return Path(checkpoint) / "calibration" / f"{scheduler}_K{num_steps}_n{n}.npz"


class DiTCacheTarget:
    """``gen`` as ``bac.protocol.CacheTarget``. Calibration inputs are labels 0, 1, ... (cycling over the classes)
    with seeded noise. With ``checkpoint``, ``cache_calibration`` loads ``calibration/<scheduler>_K<K>_n<n>.npz``
    there, making and saving it on first use; without, bac calibrates in memory each time."""

    def __init__(self, gen: DiTImageGenerator, checkpoint: str | Path | None = None, n_calibration: int = 16):
        self.gen, self.checkpoint, self.n_calibration = gen, checkpoint, n_calibration
        if checkpoint is None:
            self.cache_calibration = None  # CacheContext then calibrates with its own n

    def cache_model(self) -> torch.nn.Module:
        return self.gen.model

    def cache_signature(self) -> Signature:
        return Signature(type(self.gen.scheduler).__name__, self.gen.config.num_inference_steps,
                         fingerprint(self.gen.model))

    def cache_call(self) -> Callable[[], object]:
        """One denoiser call as sampling makes it at batch 1 (zeros, label 0, mid timestep)."""
        gen = self.gen
        x = gen.noise(1) * 0
        labels = torch.zeros(1, dtype=torch.long, device=gen.device)
        model_fn = gen.denoiser(labels)
        t = torch.tensor(gen.config.num_train_timesteps // 2, device=gen.device)
        return lambda: model_fn(x, t, 0)

    def cache_sample(self, cursor: StepCursor, n: int, seed: int) -> None:
        labels = torch.arange(n) % self.gen.config.num_classes
        self.gen.sample(labels, generator=torch.Generator().manual_seed(seed), cursor=cursor)

    def cache_calibration(self) -> Calibration:
        sig = self.cache_signature()
        path = calibration_path(self.checkpoint, sig.scheduler, sig.num_steps, self.n_calibration)
        if path.exists():
            cal = Calibration.load(path)
            if cal.model_hash == sig.model_hash and cal.num_steps == sig.num_steps:
                return cal
        cal = calibrate(self, self.n_calibration, source={"inputs": "labels 0..9 cycling, seeded noise",
                                                          "n": self.n_calibration, "seed": 0})
        cal.save(path)
        return cal
