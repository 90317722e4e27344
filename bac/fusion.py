"""Fused layers: a whole reused layer as one add, and a declared stack run by the engine itself.

A model (or the caller of ``attach``) may declare *layers* (``cache_layers``: modules whose forward returns
``x + sum of its blocks' outputs``) and a *stack* (``cache_stack``: the module whose forward runs those layers in
order, ``x = layer(x, *args, **kwargs)``). When every block of a layer reuses at a step, one add of the summed
cached deltas replaces the layer: the same value up to float summation order, and fewer Python calls and tensor
ops on the hot path. With a stack the engine runs its loop during a session, so a reused layer is that add
alone, with no module call: bitwise the same result as the layer wrappers.

The declaration is checked on the model's first call, when every block computes: a layer whose output is not
its input plus its blocks' outputs (adaLN-Zero's ``x + gate * attn(...)``: the gate lives outside the block) is
refused, because the fused add would drop the gate.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from bac.blocks import glob
from bac.wrapping import Installed, install

if TYPE_CHECKING:
    from bac.engine import CacheEngine, _Session


class LayerFusion:
    """The declared layers and stack of one engine, their wrappers and what fuses at which step."""

    def __init__(self, engine: "CacheEngine", layers: str | None, stack: str | None):
        self.engine = engine
        self.layers: list[tuple[nn.Module, list[int]]] = []  # (layer module, its blocks' indices)
        self.layer_of: list[int | None] = [None] * len(engine._blocks)
        if layers:
            rx = glob(layers)
            for name, mod in engine.model.named_modules():
                if name and rx.fullmatch(name):
                    idxs = [b for b, blk in enumerate(engine._blocks) if blk.found.parent is mod and not blk.unit]
                    if idxs:
                        for b in idxs:
                            self.layer_of[b] = len(self.layers)
                        self.layers.append((mod, idxs))
        self.ok: list[bool | None] = [None] * len(self.layers)  # verified on the first call
        self.stack = self._find_stack(stack) if self.layers else None
        self.reuse_by_step: list[tuple[bool, ...]] | None = None  # [K][n_layers]: every block of the layer reuses
        self.reused: list[list[float]] = []  # [n_layers][steps]: whole fused layers reused (one count each)
        self.forwards: list[Callable] = []  # each layer's own forward, for the stack to call directly
        self.plan: list[tuple] = []

    def _find_stack(self, name: str | None) -> nn.Module | None:
        if not name:
            return None
        try:
            stack = self.engine.model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"cache_stack {name!r} names no submodule of {type(self.engine.model).__name__}") from e
        inside = {id(m) for m in stack.modules()}
        outside = [type(layer).__name__ for layer, _ in self.layers if id(layer) not in inside]
        if outside:
            raise ValueError(f"cache_stack {name!r} does not contain every cache layer (not inside: {outside})")
        return stack

    def targets(self) -> list[tuple[object, str, str]]:
        out = [(layer, "forward", f"layer {type(layer).__name__}") for layer, _ in self.layers]
        if self.stack is not None:
            out.append((self.stack, "forward", f"stack {type(self.stack).__name__}"))
        return out

    def install(self) -> list[Installed]:
        done = []
        for li, (layer, _) in enumerate(self.layers):
            done.append(install(layer, "forward", lambda orig, li=li: self._layer_wrapper(li, orig), self.engine))
            self.forwards.append(done[-1].original)
        if self.stack is not None:
            done.append(install(self.stack, "forward", self._stack_wrapper, self.engine))
        self.plan = self._make_plan()
        return done

    def _make_plan(self) -> list[tuple]:
        return [(li, layer, idxs[0], fwd) for li, ((layer, idxs), fwd) in enumerate(zip(self.layers, self.forwards))]

    # ------------------------------------------------------------------ state the engine keeps in step
    def reset_stats(self, num_steps: int) -> None:
        self.reused = [[0.0] * num_steps for _ in self.layers]

    def apply_mask(self, mask: list[list[bool]]) -> None:
        """Which layers fuse at which step under ``mask`` [n_blocks][K] (verified or not yet checked layers)."""
        ok = [v is not False for v in self.ok]
        K = len(mask[0]) if mask else 0
        self.reuse_by_step = [tuple(good and not any(mask[b][k] for b in idxs) for good, (_, idxs) in zip(ok, self.layers))
                              for k in range(K)]

    def reindex(self, new_of: dict[int, int]) -> None:
        self.layers = [(layer, sorted(new_of[b] for b in idxs)) for layer, idxs in self.layers]
        self.layer_of = [None] * len(self.layer_of)
        for li, (_, idxs) in enumerate(self.layers):
            for b in idxs:
                self.layer_of[b] = li
        self.plan = self._make_plan()

    def finish_trace(self) -> None:
        self.ok = [v is True for v in self.ok]  # a layer that did not run in the first call does not fuse

    def entry_layer(self) -> int:
        """The layer wrapper that starts every model call (-1: the stack does, or no layer holds the first block)."""
        return self.layer_of[0] if self.stack is None and self.layer_of and self.layer_of[0] is not None else -1

    # ------------------------------------------------------------------ wrappers
    def fused_delta(self, s: "_Session", li: int) -> torch.Tensor:
        fused = s.fused[li]
        if fused is None:  # left-to-right adds: stack(...).sum(0)'s bits on the CPU, without the copy
            idxs = self.layers[li][1]
            fused = s.cache[idxs[0]]
            for b in idxs[1:]:
                fused = fused + s.cache[b]
            s.fused[li] = fused
        return fused

    def _layer_wrapper(self, li: int, original: Callable) -> Callable:
        engine = self.engine

        def layer_wrapper(x, *args, **kwargs):
            if engine._tracing:
                out = original(x, *args, **kwargs)
                if engine._tracing and self.ok[li] is None:
                    self.verify(li, x, out)
                return out
            s = engine._session
            if s is None:
                return original(x, *args, **kwargs)
            if li == engine._entry_layer:
                engine._new_call(s)
            idxs = self.layers[li][1]
            if s.mask is None or not self.reuse_by_step[s.k][li] or s.cache[idxs[0]] is None:
                return original(x, *args, **kwargs)
            self.reused[li][s.k] += 1
            return x + self.fused_delta(s, li)

        return layer_wrapper

    def _stack_wrapper(self, original: Callable) -> Callable:
        engine = self.engine

        def stack_wrapper(x, *args, **kwargs):
            s = engine._session
            if s is None or engine._tracing:
                return original(x, *args, **kwargs)
            engine._new_call(s)  # the stack starts every model call
            if s.mask is None:
                return original(x, *args, **kwargs)
            k = s.k
            reuse, cache, fused, counts = self.reuse_by_step[k], s.cache, s.fused, self.reused
            owned = False  # x was made by an add below (not the caller's, not a layer's): later adds go in place
            for li, layer, first, forward in self.plan:
                if reuse[li] and cache[first] is not None:
                    f = fused[li]
                    if f is None:
                        f = self.fused_delta(s, li)
                    if owned:
                        x.add_(f)  # the layer wrapper's add alone, without a new tensor: the same bits
                    else:
                        x, owned = x + f, True
                    counts[li][k] += 1
                else:
                    owned = False
                    if layer._forward_hooks or layer._forward_pre_hooks:
                        x = layer(x, *args, **kwargs)
                    else:  # the layer's own forward: its blocks' wrappers decide, no module call or layer wrapper
                        x = forward(x, *args, **kwargs)
            return x

        return stack_wrapper

    def verify(self, li: int, x: torch.Tensor, out) -> None:
        """Check layer ``li`` computed ``x + sum of its blocks' outputs`` in the traced call (see the module doc)."""
        layer, idxs = self.layers[li]
        values = [self.engine._trace_value.get(b) for b in idxs]
        if (any(not isinstance(v, torch.Tensor) or v.shape != x.shape for v in values)
                or not isinstance(out, torch.Tensor)):
            self.ok[li] = False  # not every block ran, or not one stream: this layer does not fuse
            return
        expect = x
        for v in values:
            expect = expect + v
        err = float((out - expect).abs().max())
        scale = float(out.abs().max()) or 1.0
        if err > 1e-4 * scale + 1e-6:
            names = [self.engine.blocks[b].name for b in idxs]
            raise ValueError(
                f"cache_layers: layer {type(layer).__name__} computes something other than its input plus the sum of "
                f"its blocks' outputs {names} (max error {err:.2e} at output scale {scale:.2e}): its residuals are gated "
                "or scaled outside those blocks (adaLN), and the fused reuse would drop that gate. Do not declare "
                "cache_layers for it (attach(..., fuse_layers=False))")
        self.ok[li] = True
