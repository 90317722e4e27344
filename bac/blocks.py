"""The shared vocabulary for cached blocks, and how the engine finds them in a model.

``bac/`` never knows a model; a block is a name string (``decoder.layers.3.ff_block``) and a ``BlockInfo``
saying its depth and kind. The Bubbling Union needs exactly that: "FFN blocks at the same or a deeper layer".

Blocks are declared by the model (a ``cache_blocks`` class attribute) or from outside (``attach(model,
blocks=...)``), as cache-dit's block adapters do, in any mix of:

  ``"transformer_blocks.*.{attn1,ff}"``      a pattern: module glob, then the branch attribute (braces expand;
                                            ``*`` is one name component, ``**`` any number); the kind comes
                                            from the attribute name (``KIND_BY_ATTR``)
  ``{"blocks.*.ffn_up": "ffn"}``             patterns with an explicit kind, for attribute names bac does not know
  ``BlockSpec("single_blocks.*", "block")``  a whole-block unit: the module itself, its output is the new stream
                                            (branches that cannot be separated, e.g. single-stream DiT blocks);
                                            ``input=`` and ``streams=`` say which call arguments carry the stream

A branch's output is the delta its caller adds to the residual stream (after whatever gate the caller applies);
a unit's cached value is its residual, output minus input per stream. The depth of a block and the order of
all blocks are measured when the model first runs with the engine attached (``CacheEngine`` re-indexes its
blocks then); before that they are the order in which the model registers its modules.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Sequence, Union

from torch import nn

KINDS = ("attn", "cross_attn", "ffn", "block")


@dataclass(frozen=True)
class BlockInfo:
    name: str  # e.g. "decoder.layers.3.ff_block"
    layer: int  # depth index of the layer holding it (0 = first to run)
    kind: str  # "attn" | "cross_attn" | "ffn" | "block" (a whole-block unit)

    def __post_init__(self):
        if not self.name:
            raise ValueError("BlockInfo.name must be a non-empty string")
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"BlockInfo.layer must be an int >= 0, got {self.layer!r} for {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"BlockInfo.kind {self.kind!r} of {self.name!r} is not one of {list(KINDS)}")


@dataclass(frozen=True)
class BlockSpec:
    """One declaration of blocks to cache (see the module docstring).

    ``pattern``: ``"<module glob>.<attribute>"`` for a residual branch, or ``"<module glob>"`` for a whole-block
    unit (``kind="block"``). ``kind``: None takes it from the attribute name. ``input``: the call argument that
    carries the stream into the block (what change indicators and token-wise methods read); None: the first
    parameter of its signature. ``streams`` (units only): for each tensor of the unit's output, the call argument
    it continues (``("encoder_hidden_states", "hidden_states")``); None: the one argument of the same shape.
    """

    pattern: str
    kind: str | None = None
    input: str | None = None
    streams: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"BlockSpec.pattern must be a non-empty string, got {self.pattern!r}")
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"BlockSpec.kind {self.kind!r} of {self.pattern!r} is not one of {list(KINDS)}")
        if self.streams is not None and self.kind != "block":
            raise ValueError(f"BlockSpec.streams is for whole-block units (kind='block'), got kind={self.kind!r}")
        if self.streams is not None:
            object.__setattr__(self, "streams", tuple(self.streams))


Spec = Union[str, BlockSpec, Mapping[str, str]]

# Attribute names of residual branches and the block kind each one is (generic conventions, not models).
KIND_BY_ATTR = {
    "sa_block": "attn", "self_attn_block": "attn", "attn": "attn", "attn1": "attn", "self_attn": "attn",
    "ca_block": "cross_attn", "cross_attn_block": "cross_attn", "attn2": "cross_attn", "cross_attn": "cross_attn",
    "ff_block": "ffn", "ff": "ffn", "ffn": "ffn", "mlp": "ffn", "ff_context": "ffn",
}  # fmt: skip
# Tried together when a model declares no `cache_blocks`: the layouts of diffusers' transformers (DiT, PixArt,
# SD3, Flux, CogVideoX, Latte, Wan, HunyuanVideo, LTX) and of timm-style and DP-T-style stacks.
DEFAULT_PATTERNS = (
    "decoder.layers.*.{sa_block,ca_block,ff_block}",
    "transformer_blocks.*.{attn1,attn2,attn,ff,ff_context}",  # joint attention ("attn") returns both streams
    "temporal_transformer_blocks.*.{attn1,attn2,ff}",
    "blocks.*.{attn1,attn2,ffn,attn,cross_attn,mlp}",
    BlockSpec("single_transformer_blocks.*", kind="block"),  # single-stream: attention and MLP share one proj_out
)
_KIND_RANK = {kind: i for i, kind in enumerate(KINDS)}


class Found(NamedTuple):
    """A block resolved in a model: ``getattr(parent, attr)`` is the callable to wrap."""

    parent: nn.Module
    attr: str
    info: BlockInfo
    spec: BlockSpec
    layer: nn.Module  # the module whose blocks share a depth: the parent of a branch, a unit itself


def _expand(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    return [x for alt in m.group(1).split(",") for x in _expand(pattern[: m.start()] + alt.strip() + pattern[m.end() :])]


def glob(pattern: str) -> re.Pattern:
    """A module-name glob: ``*`` matches one dotted name component, ``**`` any number of them, ``?`` one
    character, ``[...]`` one of a set (``[!...]`` none of it)."""
    out, i = [], 0
    while i < len(pattern):
        close = pattern.find("]", i + 2) if pattern[i] == "[" else -1
        if close > 0:
            body = pattern[i + 1 : close]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = close + 1
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def as_specs(blocks: Spec | Sequence[Spec]) -> list[BlockSpec]:
    """Normalize a declaration (a pattern, a {pattern: kind} dict, a BlockSpec, or a list of them) to specs."""
    if isinstance(blocks, (str, BlockSpec, Mapping)):
        blocks = [blocks]
    specs: list[BlockSpec] = []
    for item in blocks:
        if isinstance(item, BlockSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.append(BlockSpec(item))
        elif isinstance(item, Mapping):
            specs.extend(BlockSpec(p, k) for p, k in item.items())
        else:
            raise TypeError(f"a block declaration is a pattern string, a {{pattern: kind}} dict or a BlockSpec; got {item!r}")
    return specs


def resolve_blocks(model: nn.Module, blocks: Spec | Sequence[Spec] | None = None) -> list[Found]:
    """The blocks of ``model`` that ``blocks`` declares (None: ``model.cache_blocks``, else ``DEFAULT_PATTERNS``),
    in the order the model registers them, with a provisional depth (the layer module's rank in that order);
    the engine measures the real order and depth on the model's first call."""
    declared = getattr(model, "cache_blocks", None) if blocks is None else blocks
    specs = as_specs(DEFAULT_PATTERNS if declared is None else declared)
    position = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    modules = [(name, mod) for name, mod in model.named_modules() if name]
    found: dict[tuple[int, str], tuple] = {}
    for spec in specs:
        for rank, full in enumerate(_expand(spec.pattern)):
            if spec.kind == "block":  # a unit: the glob names the module itself
                rx = glob(full)
                for name, mod in modules:
                    if rx.fullmatch(name):
                        parent_name, _, attr = name.rpartition(".")
                        parent = model.get_submodule(parent_name) if parent_name else model
                        key = (position[id(mod)], 0, rank)
                        found.setdefault((id(parent), attr), (key, parent, attr, name, "block", spec, mod))
                continue
            prefix, _, attr = full.rpartition(".")
            rx = glob(prefix)
            for name, mod in modules:
                target = getattr(mod, attr, None) if rx.fullmatch(name) else None
                if target is None or not callable(target):
                    continue
                kind = spec.kind or KIND_BY_ATTR.get(attr)
                if kind is None:
                    raise ValueError(f"cannot tell the kind of block {name}.{attr}; known attributes: "
                                     f"{sorted(KIND_BY_ATTR)}; declare it, e.g. blocks={{{spec.pattern!r}: 'ffn'}} "
                                     f"or BlockSpec({spec.pattern!r}, kind=...), kinds {list(KINDS)}")
                child = position.get(id(target), -1) if isinstance(target, nn.Module) else -1
                key = (position[id(mod)], _KIND_RANK[kind], child, rank)
                found.setdefault((id(mod), attr), (key, mod, attr, f"{name}.{attr}", kind, spec, mod))
    if not found:
        lists = sorted(n for n, m in modules if isinstance(m, (nn.ModuleList, nn.Sequential)))
        patterns = [s.pattern for s in specs]
        raise ValueError(f"no blocks match {patterns}; module lists in this model: {lists}")
    rows = sorted(found.values(), key=lambda r: r[0])
    units = [r[3] for r in rows if r[4] == "block"]
    nested = [r[3] for r in rows for u in units if r[3] != u and r[3].startswith(u + ".")]
    if nested:
        raise ValueError(f"blocks {nested} lie inside whole-block units {units}; declare either the unit or its branches")
    depth: dict[int, int] = {}
    out = []
    for _, parent, attr, name, kind, spec, layer in rows:
        d = depth.setdefault(id(layer), len(depth))
        out.append(Found(parent, attr, BlockInfo(name, d, kind), spec, layer))
    return out


def find_blocks(model: nn.Module, pattern: Spec | Sequence[Spec] | None = None) -> list[tuple[nn.Module, str, BlockInfo]]:
    """``(parent, attr, info)`` of every declared block (see ``resolve_blocks``)."""
    return [(f.parent, f.attr, f.info) for f in resolve_blocks(model, pattern)]
