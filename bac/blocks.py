"""The shared vocabulary for cached blocks: a name plus where the block sits and what it is.

``bac/`` never knows a model; a block is a name string (``decoder.layers.3.ff_block``) and a ``BlockInfo``
saying its depth and kind. The Bubbling Union needs exactly that: "FFN blocks at the same or a deeper layer".
"""
from __future__ import annotations

from dataclasses import dataclass

KINDS = ("attn", "cross_attn", "ffn")


@dataclass(frozen=True)
class BlockInfo:
    name: str  # e.g. "decoder.layers.3.ff_block"
    layer: int  # depth index of the layer holding it (0 = first)
    kind: str  # "attn" | "cross_attn" | "ffn"

    def __post_init__(self):
        if not self.name:
            raise ValueError("BlockInfo.name must be a non-empty string")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"BlockInfo.layer must be an int >= 0, got {self.layer!r} for {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"BlockInfo.kind {self.kind!r} of {self.name!r} is not one of {list(KINDS)}")
