"""A class-conditional video DiT (diffusers ``LatteTransformer3DModel``: spatial and temporal transformer blocks
alternating) in pixel space, on the cache engine; trained here on clips of moving digits.

    gen = load_dit_video("results/dit_video", num_inference_steps=50)  # a folder train_dit.py wrote
    target = GeneratorCacheTarget(gen, "results/dit_video")  # backends/generator.py: a bac.protocol.CacheTarget
    clips = gen.sample(labels, noise=noise, cursor=engine)       # (B, 1, F, H, W) in [-1, 1]

Latte is text-conditioned (cross-attention on caption tokens); here the caption is one learned token per class
(the table's last row: the null class, dropped at ``label_dropout`` in training for classifier-free guidance).
The class also enters the timestep embedding that drives every block's adaLN modulation, as in DiT: through the
caption token alone (one key, so cross-attention adds one constant vector per class) a model trained here learned
to ignore its label (docs/dit_video.md).
The model declares its cacheable blocks (``cache_blocks``), spatial and temporal stacks both; the engine records
their execution order (spatial 0, temporal 0, spatial 1, ...) on the first call.

Shapes: B clips, F frames, H = W = canvas pixels, K denoising steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bac.blocks import BlockSpec
from backends.digits import load_digits_split
from backends.generator import Generator, GeneratorConfig, load_generator, save_generator
from backends.moving_digits import load_clip_split, make_clips


@dataclass(frozen=True)
class DiTVideoConfig(GeneratorConfig):
    """The architecture (saved in config.json with ``GeneratorConfig``'s training fields)."""

    frames: int = 8
    canvas: int = 16          # H = W of a frame
    digit: int = 12           # pixels of the moving digit (scikit-learn's 8x8 digits, bilinear upsampled: 8 px
                              # ones, one stroke per pixel, still came out as speckle after 1485 steps)
    in_channels: int = 1
    patch_size: int = 2       # 4 pixels per token (patch 4 on a 32-pixel canvas left speckle after 1200 steps)
    num_layers: int = 3       # spatial blocks; as many temporal ones
    num_heads: int = 4
    head_dim: int = 32
    caption_dim: int = 64     # the class token's width before Latte's caption projection
    label_dropout: float = 0.1

    def __post_init__(self):
        if self.canvas % self.patch_size:
            raise ValueError(f"canvas {self.canvas} is not a multiple of patch_size {self.patch_size}")
        if not 0 < self.digit <= self.canvas:
            raise ValueError(f"digit must be in (0, canvas={self.canvas}], got {self.digit}")
        if not 0 <= self.label_dropout < 1:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        super().__post_init__()


class _ClassTimestepEmbedding(nn.Module):
    """Latte's timestep embedding (``adaln_single.emb``) plus a learned class embedding: the sum conditions every
    block's adaLN modulation and the output layer's. The labels of the current call are set by
    ``LabelConditionedLatte.forward`` around its transformer call."""

    def __init__(self, timestep: nn.Module, n_labels: int, dim: int):
        super().__init__()
        self.timestep = timestep
        self.classes = nn.Embedding(n_labels, dim)
        self.labels: torch.Tensor | None = None

    def forward(self, timestep, resolution=None, aspect_ratio=None, batch_size=None, hidden_dtype=None):
        if self.labels is None:
            raise RuntimeError("the class-conditioned timestep embedding was called without labels: call "
                               "LabelConditionedLatte, not its inner transformer")
        emb = self.timestep(timestep, resolution, aspect_ratio, batch_size, hidden_dtype)
        return emb + self.classes(self.labels).to(emb.dtype)


class LabelConditionedLatte(nn.Module):
    """Latte with a learned class token as its caption. Called like diffusers' DiT:
    ``(x (B, C, F, H, W), timestep (B,), class_labels (B,), return_dict=False) -> (noise (B, C, F, H, W),)``."""

    cache_blocks = ("transformer.transformer_blocks.*.{attn1,attn2,ff}",
                    "transformer.temporal_transformer_blocks.*.{attn1,ff}")

    def __init__(self, c: DiTVideoConfig):
        super().__init__()
        from diffusers import LatteTransformer3DModel

        self.null_class, self.label_dropout = c.num_classes, c.label_dropout
        self.label_tokens = nn.Embedding(c.num_classes + 1, c.caption_dim)
        self.transformer = LatteTransformer3DModel(
            num_attention_heads=c.num_heads, attention_head_dim=c.head_dim, in_channels=c.in_channels,
            out_channels=c.in_channels, num_layers=c.num_layers, sample_size=c.canvas, patch_size=c.patch_size,
            num_embeds_ada_norm=c.num_train_timesteps, cross_attention_dim=c.num_heads * c.head_dim,
            caption_channels=c.caption_dim, video_length=c.frames, norm_type="ada_norm_single",
            activation_fn="gelu-approximate",
        )
        ada = self.transformer.adaln_single
        ada.emb = _ClassTimestepEmbedding(ada.emb, c.num_classes + 1, c.num_heads * c.head_dim)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor, return_dict: bool = False):
        if self.training and self.label_dropout > 0:  # classifier-free guidance's unconditional examples
            drop = torch.rand(class_labels.shape, device=class_labels.device) < self.label_dropout
            class_labels = torch.where(drop, torch.full_like(class_labels, self.null_class), class_labels)
        caption = self.label_tokens(class_labels)[:, None]  # (B, 1, caption_dim)
        emb = self.transformer.adaln_single.emb
        emb.labels = class_labels
        try:
            return self.transformer(x, timestep=timestep, encoder_hidden_states=caption, return_dict=return_dict)
        finally:
            emb.labels = None


class DiTVideoGenerator(Generator):
    Config = DiTVideoConfig

    def build(self, c: DiTVideoConfig) -> nn.Module:
        return LabelConditionedLatte(c)

    @property
    def sample_shape(self) -> tuple[int, int, int, int]:
        c = self.config
        return (c.in_channels, c.frames, c.canvas, c.canvas)

    def as_images(self, x: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, F, H, W) -> frames (B * F, C, H, W), clip-major."""
        return x.transpose(1, 2).flatten(0, 1)

    def image_labels(self, labels: torch.Tensor) -> torch.Tensor:
        return labels.repeat_interleave(self.config.frames)

    def unit_blocks(self) -> list[BlockSpec]:
        return [BlockSpec("transformer.transformer_blocks.*", kind="block"),
                BlockSpec("transformer.temporal_transformer_blocks.*", kind="block")]

    def digits_split(self):
        return load_digits_split(self.config.digit)

    def real_split(self):
        c = self.config
        return load_clip_split(c.digit, c.canvas, c.frames)

    def training_batch(self, digits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Fresh clips (N, 1, F, S, S) of ``digits`` (N, 1, D, D), motion drawn from ``generator``."""
        return make_clips(digits, self.config.frames, self.config.canvas, generator)


def save_dit_video(gen: DiTVideoGenerator, directory: str | Path, record: dict | None = None,
                   extra_files: tuple[str, ...] = ()) -> None:
    save_generator(gen, directory, record, extra_files)


def load_dit_video(directory: str | Path, **overrides) -> DiTVideoGenerator:
    """Load a checkpoint folder (sha256 checked); ``overrides`` set inference options (None keeps the default)."""
    return load_generator(DiTVideoGenerator, directory, "python eval/train_dit.py --backend dit_video", **overrides)

