"""A class-conditional image DiT (diffusers ``DiTTransformer2DModel`` in pixel space) on the cache engine.

    gen = load_dit_image("checkpoints/dit_image", num_inference_steps=50)
    target = GeneratorCacheTarget(gen, "checkpoints/dit_image")  # backends/generator.py: a bac.protocol.CacheTarget
    engine = bac.protocol.attach_to(target, bac.methods.build_cache(target, {"name": "bac", "n_updates": 10}))
    images = gen.sample(labels, noise=noise, cursor=engine)      # (B, 1, H, W) in [-1, 1]

The denoiser predicts the noise (epsilon); a diffusers DDIM (deterministic, default) or DDPM scheduler drives
``bac.sampling.denoise``. Classifier-free guidance (``guidance_scale`` > 1; the label table's last row is the
null class, dropped at 10% in training by diffusers' label embedding) runs conditional and unconditional
halves as one batched call, so the engine keeps one cache per step.

Shapes: B images, H = W = image_size, K denoising steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from bac.blocks import BlockSpec
from backends.digits import load_digits_split
from backends.generator import Generator, GeneratorConfig, load_generator, save_generator


@dataclass(frozen=True)
class DiTImageConfig(GeneratorConfig):
    """The architecture (saved in config.json with ``GeneratorConfig``'s training fields)."""

    image_size: int = 16
    in_channels: int = 1
    patch_size: int = 2
    num_layers: int = 4
    num_heads: int = 4
    head_dim: int = 32

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        super().__post_init__()


class DiTImageGenerator(Generator):
    Config = DiTImageConfig

    def build(self, c: DiTImageConfig) -> nn.Module:
        from diffusers import DiTTransformer2DModel

        return DiTTransformer2DModel(
            num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
            num_layers=c.num_layers, sample_size=c.image_size, patch_size=c.patch_size,
            num_embeds_ada_norm=c.num_classes,  # label table num_classes + 1: the last row is the null class
        )

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    def unit_blocks(self) -> list[BlockSpec]:
        return [BlockSpec("transformer_blocks.*", kind="block")]

    def digits_split(self):
        return load_digits_split(self.config.image_size)


def save_dit_image(gen: DiTImageGenerator, directory: str | Path, record: dict | None = None,
                   extra_files: tuple[str, ...] = ()) -> None:
    save_generator(gen, directory, record, extra_files)


def load_dit_image(directory: str | Path, **overrides) -> DiTImageGenerator:
    """Load a checkpoint folder (sha256 checked against manifest.json); ``overrides`` set inference options
    (``scheduler``, ``num_inference_steps``, ``guidance_scale``); None keeps the default."""
    return load_generator(DiTImageGenerator, directory, "python eval/train_dit.py", **overrides)

