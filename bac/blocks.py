"""The shared vocabulary for cached blocks, and how the engine finds them in a model.

``bac/`` never knows a model; a block is a name string (``decoder.layers.3.ff_block``) and a ``BlockInfo``
saying its depth and kind. The Bubbling Union needs exactly that: "FFN blocks at the same or a deeper layer".
``find_blocks`` resolves a model's ``cache_blocks`` declaration, or a pattern, to the branches to wrap.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Sequence

from torch import nn

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


# Attribute names of residual branches and the block kind each one is (generic conventions, not models).
KIND_BY_ATTR = {
    "sa_block": "attn", "self_attn_block": "attn", "attn": "attn", "attn1": "attn", "self_attn": "attn",
    "ca_block": "cross_attn", "cross_attn_block": "cross_attn", "attn2": "cross_attn", "cross_attn": "cross_attn",
    "ff_block": "ffn", "ff": "ffn", "ffn": "ffn", "mlp": "ffn",
}  # fmt: skip
# Patterns tried when a model does not declare `cache_blocks` (diffusers and timm-style layouts).
DEFAULT_PATTERNS = (
    "decoder.layers.*.{sa_block,ca_block,ff_block}",
    "transformer_blocks.*.{attn1,attn2,ff}",
    "blocks.*.{attn,cross_attn,mlp}",
)


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[: m.start()] + alt.strip() + pattern[m.end() :])]


def find_blocks(model: nn.Module, pattern: str | Sequence[str] | None = None) -> list[tuple[nn.Module, str, BlockInfo]]:
    """Resolve block patterns (``"<module glob>.<attribute>"``, braces allowed) to (parent, attr, info)."""
    if pattern is None:
        pattern = getattr(model, "cache_blocks", None)
    patterns = [pattern] if isinstance(pattern, str) else list(pattern) if pattern is not None else list(DEFAULT_PATTERNS)
    modules = dict(model.named_modules())
    found: list[tuple[nn.Module, str, BlockInfo]] = []
    for pat in patterns:
        for full in _expand(pat):
            prefix, _, attr = full.rpartition(".")
            for name, mod in modules.items():
                if name and fnmatch.fnmatchcase(name, prefix) and callable(getattr(mod, attr, None)):
                    layers = re.findall(r"\.(\d+)(?:\.|$)", "." + name)
                    kind = KIND_BY_ATTR.get(attr)
                    if kind is None:
                        raise ValueError(f"cannot tell the kind of block {name}.{attr}; known attributes: {sorted(KIND_BY_ATTR)}")
                    found.append((mod, attr, BlockInfo(f"{name}.{attr}", int(layers[-1]) if layers else 0, kind)))
        if found and pattern is None:
            break
    if not found:
        lists = sorted(n for n, m in modules.items() if isinstance(m, (nn.ModuleList, nn.Sequential)))
        raise ValueError(f"no blocks match {patterns}; module lists in this model: {lists}")
    order = {"attn": 0, "cross_attn": 1, "ffn": 2}
    found.sort(key=lambda f: (f[2].layer, order[f[2].kind], f[2].name))
    return found
