"""The cache engine: wraps named residual branches of any model from outside and replays a schedule.

    engine = bac.attach(model)                       # blocks from model.cache_blocks, or a pattern
    engine.set_schedule(schedule)                    # a bac.schedule.Schedule (mask [n_blocks, K])
    with engine.session(K):                          # the sampler opens one session per action chunk
        for k, t in enumerate(timesteps):
            engine.step(k, t)                        # ... and announces every step before the model call
            eps = model(x_t, t, cond)                # wrapped branches compute or reuse per mask[b, k]
    engine.detach()                                  # the model is exactly as before

A *block* is a callable attribute of a submodule whose output is the delta that the caller adds to the
residual stream (a bound method such as ``decoder.layers.3.ff_block`` or a child module such as
``transformer_blocks.3.ff``). At a compute step the block runs and its output is kept; at a reuse step
the kept output is returned without running the block, so the caller computes ``x + delta_cached`` on
the *current* stream (BAC's residual reuse). The cache lives for one session and is dropped when the
session ends, also on an exception: nothing leaks across observations, episodes or batches.

Hot path: the mask is a host-side list of booleans built before sampling, so a wrapper decides with a
Python index and never synchronizes with the device.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from bac.blocks import DEFAULT_PATTERNS, KIND_BY_ATTR, BlockInfo, find_blocks  # noqa: F401 (discovery)

FIRST_INPUT = "<first block input>"  # recording key of the stream entering the first block


@dataclass
class _Session:
    num_steps: int
    mask: list[list[bool]] | None  # [n_blocks][K]; None: compute everything
    k: int = -1
    cache: list[torch.Tensor | None] = field(default_factory=list)
    fused: list[torch.Tensor | None] = field(default_factory=list)  # per fused layer: sum of its cached deltas
    cache_bytes: int = 0


class CacheEngine:
    """Owns the wrapped blocks, the step cursor and the schedule; see the module docstring."""

    def __init__(self, model: nn.Module, found: list[tuple[nn.Module, str, BlockInfo]], fuse_layers: bool = True):
        self.model = model
        self._targets = [(parent, attr) for parent, attr, _ in found]
        self.blocks = [info for _, _, info in found]
        # Layers declared by the model as "output = input + sum of my blocks' outputs" (``cache_layers``):
        # when all their blocks reuse at a step, one add of the summed deltas replaces the whole layer.
        self._layers: list[tuple[nn.Module, list[int]]] = []
        self._layer_of: list[int | None] = [None] * len(self.blocks)
        if fuse_layers:
            self._find_layers(getattr(model, "cache_layers", None))
        self._reuse_by_step: list[tuple[bool, ...]] | None = None  # [K][n_layers]: every block of the layer reuses
        # A stack declared by the model (``cache_stack``: a module whose forward applies the ``cache_layers``
        # in order, ``x = layer(x, *args, **kwargs)``) is run by the engine itself, so a reused layer costs
        # one add instead of a module call, a wrapper and the add, and a computing layer runs its own forward
        # without the module call (with it when the layer has hooks, so they still fire).
        self._stack: nn.Module | None = None
        if self._layers:
            self._find_stack(getattr(model, "cache_stack", None))
        self.schedule = None
        self._strategy = None  # a bac.strategies.Strategy, or None for the schedule (mask) path
        self._mask_list: list[list[bool]] | None = None
        self._session: _Session | None = None
        self._record: dict[str, list[torch.Tensor]] | None = None
        self._flop_mode = None
        self.block_flops = np.zeros(len(self.blocks))
        self._installed: list[tuple[object, str]] = []  # (object patched, attribute set on its instance)
        self.reset_stats()
        for b, (parent, attr) in enumerate(self._targets):
            self._install(b, parent, attr)
        self._layer_forwards: list[Callable] = []  # each layer's own forward, for the stack to call directly
        for li, (layer, _) in enumerate(self._layers):
            if "forward" in layer.__dict__:
                raise RuntimeError(f"layer {type(layer).__name__} is already wrapped (is another engine attached?)")
            self._layer_forwards.append(layer.forward)
            layer.__dict__["forward"] = self._make_layer_wrapper(li, layer.forward)
            self._installed.append((layer, "forward"))
        if self._stack is not None:
            if "forward" in self._stack.__dict__:
                raise RuntimeError(f"stack {type(self._stack).__name__} is already wrapped (is another engine attached?)")
            self._stack.__dict__["forward"] = self._make_stack_wrapper(self._stack.forward)
            self._installed.append((self._stack, "forward"))

    def _find_layers(self, pattern: str | None) -> None:
        if not pattern:
            return
        for name, mod in self.model.named_modules():
            if name and fnmatch.fnmatchcase(name, pattern):
                idxs = [b for b, (parent, _) in enumerate(self._targets) if parent is mod]
                if idxs:
                    for b in idxs:
                        self._layer_of[b] = len(self._layers)
                    self._layers.append((mod, idxs))

    def _find_stack(self, name: str | None) -> None:
        if not name:
            return
        try:
            stack = self.model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"cache_stack {name!r} names no submodule of {type(self.model).__name__}") from e
        inside = {id(m) for m in stack.modules()}
        outside = [type(layer).__name__ for layer, _ in self._layers if id(layer) not in inside]
        if outside:
            raise ValueError(f"cache_stack {name!r} does not contain every cache layer (not inside: {outside})")
        self._stack = stack

    def _fused_delta(self, s: "_Session", li: int) -> torch.Tensor:
        fused = s.fused[li]
        if fused is None:  # left-to-right adds: stack(...).sum(0)'s bits on the CPU, without the copy
            idxs = self._layers[li][1]
            fused = s.cache[idxs[0]]
            for b in idxs[1:]:
                fused = fused + s.cache[b]
            s.fused[li] = fused
        return fused

    def _make_stack_wrapper(self, original: Callable) -> Callable:
        plan = [(li, layer, idxs[0], fwd) for li, ((layer, idxs), fwd) in enumerate(zip(self._layers, self._layer_forwards))]

        def stack_wrapper(x, *args, **kwargs):
            s = self._session
            if s is None or s.mask is None:
                return original(x, *args, **kwargs)
            k = s.k
            reuse, cache, fused, counts = self._reuse_by_step[k], s.cache, s.fused, self._layer_reused
            owned = False  # x was made by an add below (not the caller's, not a layer's): later adds go in place
            for li, layer, first, forward in plan:
                if reuse[li] and cache[first] is not None:
                    f = fused[li]
                    if f is None:
                        f = self._fused_delta(s, li)
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

    def _make_layer_wrapper(self, li: int, original: Callable) -> Callable:
        idxs = self._layers[li][1]

        def layer_wrapper(x, *args, **kwargs):
            s = self._session
            if s is None or s.mask is None or not self._reuse_by_step[s.k][li] or s.cache[idxs[0]] is None:
                return original(x, *args, **kwargs)
            self._layer_reused[li][s.k] += 1
            return x + self._fused_delta(s, li)

        return layer_wrapper

    # ------------------------------------------------------------------ wrapping
    def _install(self, b: int, parent: nn.Module, attr: str) -> None:
        target = getattr(parent, attr)
        if isinstance(target, nn.Module):  # wrap the child's forward on the instance
            obj, name, original = target, "forward", target.forward
        else:  # a bound method: shadow it with an instance attribute
            obj, name, original = parent, attr, target
        if name in obj.__dict__:
            raise RuntimeError(f"block {self.blocks[b].name} is already wrapped (is another engine attached?)")
        obj.__dict__[name] = self._make_wrapper(b, original)
        self._installed.append((obj, name))

    def _make_wrapper(self, b: int, original: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            s = self._session
            if s is None:
                if self._flop_mode is not None:
                    before = self._flop_mode.get_total_flops()
                    out = original(*args, **kwargs)
                    self.block_flops[b] = self._flop_mode.get_total_flops() - before
                    return out
                return original(*args, **kwargs)
            k = s.k
            if self._strategy is not None:
                out, frac = self._strategy.block(b, k, original, args, kwargs)
                self._computed[b][k] += frac
                self._reused[b][k] += 1.0 - frac
                if self._record is not None and frac > 0:
                    self._record[self.blocks[b].name].append(out.detach().float().cpu())
                return out
            cached = s.cache[b]
            if cached is not None and s.mask is not None and not s.mask[b][k]:
                self._reused[b][k] += 1
                return cached
            out = original(*args, **kwargs)
            self._computed[b][k] += 1
            if s.mask is not None:
                if cached is None:
                    s.cache_bytes += out.numel() * out.element_size()
                s.cache[b] = out
                li = self._layer_of[b]
                if li is not None:
                    s.fused[li] = None
            if self._record is not None:
                self._record[self.blocks[b].name].append(out.detach().float().cpu())
                if b == 0 and FIRST_INPUT in self._record:
                    self._record[FIRST_INPUT].append(args[0].detach().float().cpu())
            return out

        return wrapper

    def detach(self) -> None:
        """Remove every wrapper; the model's modules and methods are exactly as before ``attach``."""
        for obj, name in self._installed:
            obj.__dict__.pop(name, None)
        self._installed.clear()
        self._session = None

    # ------------------------------------------------------------------ schedule and cursor
    def set_schedule(self, schedule) -> None:
        """Use ``schedule`` (a ``bac.schedule.Schedule``), a ``bac.strategies.Strategy``, or ``None`` (compute
        every block every step). A strategy replaces the mask: it decides per block call (see its module)."""
        from bac.strategies import Strategy

        if self._session is not None:
            raise RuntimeError("cannot change the schedule inside a cache session")
        self._strategy = None
        if isinstance(schedule, Strategy):
            schedule.bind(self.blocks)
            self.schedule, self._mask_list, self._strategy = None, None, schedule
            return
        if schedule is None:
            self.schedule, self._mask_list = None, None
            return
        schedule.check_compatible(blocks=[b.name for b in self.blocks])
        mask = schedule.to_mask()  # (n_blocks, K) in schedule.blocks order
        index = {name: i for i, name in enumerate(schedule.blocks)}
        self._mask_list = [mask[index[b.name]].tolist() for b in self.blocks]
        K = mask.shape[1]
        self._reuse_by_step = [tuple(not any(self._mask_list[b][k] for b in idxs) for _, idxs in self._layers)
                               for k in range(K)]
        self.schedule = schedule

    @contextmanager
    def session(self, num_steps: int) -> Iterator["CacheEngine"]:
        """One sampling run of ``num_steps`` steps; the cache is empty at its start and dropped at its end."""
        if self._session is not None:
            raise RuntimeError("a cache session is already open; sessions do not nest")
        if self.schedule is not None:
            self.schedule.check_compatible(num_steps=num_steps)
        if num_steps > len(self._computed[0]):
            self._grow_stats(num_steps)
        strategy = self._strategy
        if strategy is not None:
            strategy.begin(num_steps)
        self._session = _Session(num_steps, self._mask_list, cache=[None] * len(self.blocks),
                                 fused=[None] * len(self._layers))
        try:
            yield self
        finally:
            self.peak_cache_bytes = max(self.peak_cache_bytes, self._session.cache_bytes)
            self._session = None
            self.n_sessions += 1
            if strategy is not None:
                strategy.end()

    def step(self, k: int, t=None) -> None:
        """The sampler announces denoising step ``k`` (0-based) with timestep ``t`` before calling the model."""
        s = self._session
        if s is None:
            raise RuntimeError("engine.step() outside engine.session(); the sampler must open a session first")
        if not 0 <= k < s.num_steps:
            raise IndexError(f"step {k} is outside the session's {s.num_steps} steps")
        s.k = k
        if self._strategy is not None:
            self._strategy.step(k, t)

    # ------------------------------------------------------------------ statistics
    def reset_stats(self, num_steps: int = 1) -> None:
        # Counted in plain lists on the hot path (a list item add costs a tenth of a numpy item add);
        # read as float arrays (a token-wise strategy computes a fraction of a block).
        self._computed = [[0.0] * num_steps for _ in self.blocks]
        self._reused = [[0.0] * num_steps for _ in self.blocks]
        self._layer_reused = [[0.0] * num_steps for _ in self._layers]  # whole fused layers: one count each
        self.peak_cache_bytes = 0
        self.n_sessions = 0

    def _grow_stats(self, num_steps: int) -> None:
        for rows in (self._computed, self._reused, self._layer_reused):
            for row in rows:
                row.extend([0.0] * (num_steps - len(row)))

    @property
    def computed(self) -> np.ndarray:
        """Block calls computed, [n_blocks, steps], summed over sessions (fractions for token-wise strategies)."""
        return np.array(self._computed, dtype=np.float64).reshape(len(self.blocks), -1)

    @property
    def reused(self) -> np.ndarray:
        """Block calls served from the cache, [n_blocks, steps], summed over sessions."""
        out = np.array(self._reused, dtype=np.float64).reshape(len(self.blocks), -1)
        for (_, idxs), counts in zip(self._layers, self._layer_reused):
            out[idxs] += np.asarray(counts, dtype=np.float64)  # a fused layer's reuse is each of its blocks'
        return out

    @contextmanager
    def recording(self, first_input: bool = False) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Keep every block output of every step (for calibration); use with no schedule (compute all).
        With ``first_input``, also the first block's input (the stream entering the stack) under the key
        ``bac.engine.FIRST_INPUT``."""
        self._record = {b.name: [] for b in self.blocks}
        if first_input:
            self._record[FIRST_INPUT] = []
        try:
            yield self._record
        finally:
            self._record = None

    def profile_flops(self, forward: Callable[[], object]) -> dict:
        """Count matmul FLOPs of one uncached model call, per block and in total (torch's FlopCounterMode).

        Attention score products are counted where torch counts them (CUDA kernels), not on the CPU;
        at DP-T sizes they are under 2% of a block. Returns {"total", "blocks", "by_kind"} per model call.
        """
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as mode:
            self._flop_mode = mode
            try:
                with torch.no_grad():
                    forward()
            finally:
                self._flop_mode = None
        self.model_flops = float(mode.get_total_flops())
        by_kind: dict[str, float] = {}
        for info, f in zip(self.blocks, self.block_flops):
            by_kind[info.kind] = by_kind.get(info.kind, 0.0) + float(f)
        return {"total": self.model_flops, "blocks": self.block_flops.tolist(), "by_kind": by_kind}

    def flops_ratio(self, mask: np.ndarray | None = None) -> float:
        """Analytic FLOPs of a sampling run under ``mask`` (default: the schedule) over the uncached run."""
        if not hasattr(self, "model_flops"):
            raise RuntimeError("call engine.profile_flops(...) first")
        if mask is None and self._strategy is not None:
            return self.measured_flops_ratio()
        if mask is None:
            mask = np.ones((len(self.blocks), 1), bool) if self.schedule is None else np.asarray(self._mask_list)
        K = mask.shape[1]
        overhead = self.model_flops - self.block_flops.sum()
        cached = K * overhead + float((self.block_flops[:, None] * mask).sum())
        return cached / (K * self.model_flops)

    def measured_flops_ratio(self) -> float:
        """FLOPs ratio from what actually ran (the computed fraction of every block call, summed over the
        sessions so far): the ratio for online strategies, whose mask is known only after the fact."""
        computed = self.computed
        calls = computed + self.reused
        steps = calls.max(0) > 0
        if not steps.any():
            raise RuntimeError("no cache session has run yet")
        frac = np.where(calls > 0, computed / np.maximum(calls, 1e-12), 1.0)[:, steps]
        return self.flops_ratio(frac)

    def stats(self) -> dict:
        """Per-block computed/reused counts summed over sessions, and the cache's peak memory."""
        computed, reused = self.computed, self.reused
        total = computed.sum() + reused.sum()
        return {
            "blocks": [b.name for b in self.blocks],
            "computed": computed.sum(1).tolist(),
            "reused": reused.sum(1).tolist(),
            "computed_fraction": float(computed.sum() / total) if total else float("nan"),
            "peak_cache_mb": round(self.peak_cache_bytes / 2**20, 3),
            "sessions": self.n_sessions,
            **({"strategy": self._strategy.describe(), **self._strategy.stats()} if self._strategy is not None else {}),
        }


def attach(model: nn.Module, schedule=None, blocks: str | Sequence[str] | None = None,
           fuse_layers: bool = True) -> CacheEngine:
    """Wrap ``model``'s residual branches from outside and return the engine that drives them.

    ``blocks``: a pattern such as ``"decoder.layers.*.{sa_block,ca_block,ff_block}"`` (module glob, then
    the branch attribute), a list of them, or ``None`` for the model's ``cache_blocks`` declaration or
    the common layouts in ``DEFAULT_PATTERNS``. With ``fuse_layers`` and a model that declares
    ``cache_layers`` (modules whose forward returns its input plus the sum of its blocks' outputs), a
    layer whose blocks all reuse at a step is replaced by one add of their summed cached deltas: the same
    value up to float summation order, and fewer Python calls and tensor ops on the hot path. A model that
    also declares ``cache_stack`` (the module whose forward runs those layers in order, each as
    ``x = layer(x, *args, **kwargs)``) has that loop run by the engine during a session, so a reused layer
    is that add alone, with no module call: bitwise the same result as the layer wrappers.
    """
    engine = CacheEngine(model, find_blocks(model, blocks), fuse_layers=fuse_layers)
    engine.set_schedule(schedule)
    return engine


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names, shapes and values) to tie schedules to it."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
