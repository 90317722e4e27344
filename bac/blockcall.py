"""One wrapped block and its calls: where its stream enters, and what the engine caches from its output.

A call's stream argument is found through the callable's signature (by position, else by keyword), so blocks
called with keywords work (``block(hidden_states=..., temb=...)``). A branch caches its output (the delta its
caller adds); a whole-block unit caches its residual, each output tensor minus the argument it continues
(``BlockSpec.streams``, else the one argument of the same shape and dtype, matched on the first call), and a
reused residual is added to the current arguments.
"""
from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Callable

import torch

from bac import tree
from bac.blocks import Found

Where = tuple  # (position or None, parameter name or None)


def arg(where: Where, args: tuple, kwargs: dict):
    """The argument at ``where`` in a call, or None if the call did not pass it."""
    pos, name = where
    if pos is not None and pos < len(args):
        return args[pos]
    return kwargs.get(name) if name is not None else None


@dataclass(eq=False)
class WrappedBlock:
    index: int  # the block's index in the engine (its rank in run order once the first call was traced)
    found: Found
    in_arg: Where = (0, None)  # where the stream enters
    params: list[Where] = field(default_factory=list)  # every named parameter
    streams: list[Where] | None = None  # units: the argument each output tensor continues
    original: Callable | None = None  # the callable the wrapper calls

    @property
    def name(self) -> str:
        return self.found.info.name

    @property
    def unit(self) -> bool:
        return self.found.info.kind == "block"

    def read_signature(self, original: Callable) -> None:
        """Where the stream enters: ``spec.input`` or the first parameter, by position and by name."""
        self.original = original
        try:
            params = list(inspect.signature(original).parameters.values())
        except (TypeError, ValueError):
            return
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self.params = [(i if p.kind in positional else None, p.name) for i, p in enumerate(params)
                       if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
        want = self.found.spec.input
        if want is not None:
            match = [w for w in self.params if w[1] == want]
            if not match:
                raise ValueError(f"block {self.name} has no parameter {want!r} (BlockSpec.input); "
                                 f"its parameters: {[n for _, n in self.params]}")
            self.in_arg = match[0]
        elif self.params:
            self.in_arg = self.params[0]

    def input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        return arg(self.in_arg, args, kwargs)

    def _resolve_streams(self, out, args, kwargs) -> None:
        outs = tree.tensors(out)
        declared = self.found.spec.streams
        if declared is not None:
            by_name = {w[1]: w for w in self.params}
            missing = [n for n in declared if n not in by_name]
            if missing or len(declared) != len(outs):
                raise ValueError(f"unit {self.name}: streams={declared} must name one parameter per output "
                                 f"tensor ({len(outs)}); parameters: {list(by_name)}")
            self.streams = [by_name[n] for n in declared]
            return
        given = [(w, arg(w, args, kwargs)) for w in self.params]
        streams: list[Where] = []
        for j, o in enumerate(outs):
            cands = [w for w, v in given if isinstance(v, torch.Tensor) and v.shape == o.shape and v.dtype == o.dtype
                     and w not in streams]
            if len(cands) != 1:
                raise ValueError(f"unit {self.name}: cannot tell which argument its output tensor {j} "
                                 f"{tuple(o.shape)} continues (candidates {[n for _, n in cands]}); declare it, "
                                 f"e.g. BlockSpec({self.found.spec.pattern!r}, kind='block', streams=(...))")
            streams.append(cands[0])
        self.streams = streams

    def value(self, out, args, kwargs):
        """What is cached for a call: its output, or a unit's residual (output minus input per stream)."""
        if not self.unit:
            return out
        if self.streams is None:
            self._resolve_streams(out, args, kwargs)
        return tree.map_tensors(operator.sub, out, [arg(w, args, kwargs) for w in self.streams])

    def rebuild(self, value, args, kwargs):
        """A cached value as the call's output: a unit's residual added to its current inputs."""
        if not self.unit:
            return value
        return tree.map_tensors(lambda d, x: x + d, value, [arg(w, args, kwargs) for w in self.streams])
