"""The cache engine: wraps declared blocks of any model from outside and replays a schedule or a strategy.

    engine = bac.attach(model)                       # blocks from model.cache_blocks, a declaration, or defaults
    engine.set_schedule(schedule)                    # a bac.schedule.Schedule (mask [n_blocks, K]) or a Strategy
    with engine.session(K):                          # the sampler opens one session per sample
        for k, t in enumerate(timesteps):
            engine.step(k, t)                        # ... and announces every step before the model call(s)
            eps = model(x_t, t, cond)                # wrapped blocks compute or reuse per mask[b, k]
    engine.detach()                                  # the model is exactly as before

A *block* (``bac.blocks``) is a residual branch, whose output is the delta its caller adds to the stream (a bound
method such as ``decoder.layers.3.ff_block`` or a child module such as ``transformer_blocks.3.ff``), or a
whole-block unit, whose cached value is its residual (output minus input, per stream). At a compute step the
block runs and its value is kept; at a reuse step the kept value is returned without running the block, so the
caller computes ``x + delta_cached`` on the *current* stream (BAC's residual reuse). Outputs may be tuples (joint
attention's image and context streams): every tensor is cached and the same structure comes back. Inputs are
found through the call signature, so blocks called with keywords work.

The model's first call with the engine attached is traced (``bac.tracing``): every block computes, and the order
in which blocks run and their depth (the rank of the module holding them) are recorded; the engine re-indexes its
blocks to that order, so ``engine.blocks`` lists them as they run, also across several stacks (Flux's double-
then single-stream blocks, Latte's interleaved spatial and temporal blocks). Within a step, each model call has
its own cache (CFG run as a conditional and an unconditional call): the k-th call of a step reuses what the k-th
call computed.

The cache lives for one session and is dropped when the session ends, also on an exception: nothing leaks across
observations, episodes or batches. Hot path: the mask is a host-side list of booleans built before sampling, so
a wrapper decides with a Python index and never synchronizes with the device.
"""
from __future__ import annotations

import copy
import hashlib
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from bac import tree
from bac.accounting import Accounting
from bac.blocks import DEFAULT_PATTERNS, KIND_BY_ATTR, BlockInfo, BlockSpec, Found, find_blocks, resolve_blocks  # noqa: F401
from bac.blockcall import WrappedBlock
from bac.fusion import LayerFusion
from bac.tracing import FIRST_INPUT, OrderTrace  # noqa: F401 (FIRST_INPUT: a recording key callers use)
from bac.wrapping import WrapperConflict, check_free, install, uninstall  # noqa: F401



@dataclass(eq=False)
class _Session:
    num_steps: int
    mask: list[list[bool]] | None  # [n_blocks][K]; None: compute everything (or a strategy decides)
    caches: list[list]  # per model call of a step: per block its cached value (delta, or a unit's residual)
    fuseds: list[list]  # per model call: per fused layer the sum of its cached deltas
    strategies: list  # per model call: the strategy (call 0's is the engine's; later ones are fresh copies)
    k: int = -1
    t: object = None
    call: int = -1  # index of the current model call within step k
    cache_bytes: int = 0

    def __post_init__(self):
        self.cache, self.fused = self.caches[0], self.fuseds[0]
        self.strategy = self.strategies[0] if self.strategies else None


class CacheEngine(Accounting, OrderTrace):
    """Owns the wrapped blocks, the step cursor and the schedule; see the module docstring."""

    def __init__(self, model: nn.Module, found: list[Found], fuse_layers: bool = True,
                 layers: str | None = None, stack: str | None = None):
        self.model = model
        self._blocks = [WrappedBlock(i, f) for i, f in enumerate(found)]
        self.blocks = [f.info for f in found]
        if fuse_layers:  # declared layers and stack (see bac.fusion)
            layers = layers if layers is not None else getattr(model, "cache_layers", None)
            stack = stack if stack is not None else getattr(model, "cache_stack", None)
        self._fusion = LayerFusion(self, layers if fuse_layers else None, stack if fuse_layers else None)
        self.schedule = None
        self._strategy = None  # a bac.strategies.Strategy, or None for the schedule (mask) path
        self._mask_list: list[list[bool]] | None = None
        self._session: _Session | None = None
        self._record: dict[str, list[torch.Tensor]] | None = None
        self._flop_mode = None
        self.block_flops = np.zeros(len(self.blocks))
        self._detached = False
        # The first model call is traced (see the module docstring): order, depth, the blocks' values.
        self._tracing = True
        self._trace: list[int] = []
        self._trace_seen: set[int] = set()
        self._trace_log: list[tuple] = []  # in a session: (block, args, kwargs, value) to replay into its state
        self._trace_value: dict[int, object] = {}
        self._entry_block, self._entry_layer = -1, -1  # which wrapper starts a model call (set after the trace)
        self.reset_stats()
        targets = []
        for f in found:
            target = getattr(f.parent, f.attr)
            targets.append((target, "forward") if isinstance(target, nn.Module) else (f.parent, f.attr))
        for (obj, name), f in zip(targets, found):  # all checked before anything is set: a refusal leaves no trace
            check_free(obj, name, f.info.name)
        for obj, name, label in self._fusion.targets():
            check_free(obj, name, label)
        self._installed = []
        try:
            for blk, (obj, name) in zip(self._blocks, targets):
                self._installed.append(install(obj, name, lambda orig, blk=blk: self._make_wrapper(blk, orig), self))
            self._installed += self._fusion.install()
        except BaseException:  # e.g. a declared input the block does not take: take off what was set
            self.detach()
            raise

    # ------------------------------------------------------------------ wrappers
    def _make_wrapper(self, blk: WrappedBlock, original: Callable) -> Callable:
        blk.read_signature(original)

        def wrapper(*args, **kwargs):
            entered = False
            if self._tracing:
                if blk.index not in self._trace_seen:
                    return self._traced_call(blk, args, kwargs)
                self._finish_trace(again=True)  # a block runs twice: the first model call is over
                entered = True
            b = blk.index
            s = self._session
            if s is None:
                if self._flop_mode is not None:
                    return self._counted(blk, args, kwargs)
                return original(*args, **kwargs)
            if b == self._entry_block and not entered:
                self._new_call(s)
            k = s.k
            if s.strategy is not None:
                return self._strategy_call(blk, s, k, args, kwargs)
            cached = s.cache[b]
            if cached is not None and s.mask is not None and not s.mask[b][k]:
                self._reused[b][k] += 1
                return blk.rebuild(cached, args, kwargs) if blk.unit else cached
            out = original(*args, **kwargs)
            self._computed[b][k] += 1
            if s.mask is None and self._record is None:
                return out
            value = blk.value(out, args, kwargs) if blk.unit else out
            if s.mask is not None:
                if cached is None:
                    s.cache_bytes += tree.nbytes(value)
                s.cache[b] = value
                li = self._fusion.layer_of[b]
                if li is not None:
                    s.fused[li] = None
            if self._record is not None:
                self._record_call(b, value, args, kwargs)
            return out

        return wrapper

    def _counted(self, blk: WrappedBlock, args, kwargs):
        before = self._flop_mode.get_total_flops()
        out = blk.original(*args, **kwargs)
        self.block_flops[blk.index] = self._flop_mode.get_total_flops() - before
        return out

    def _record_call(self, b: int, value, args, kwargs) -> None:
        self._record[self.blocks[b].name].append(tree.detach_float_cpu(value))
        if b == 0 and FIRST_INPUT in self._record:
            self._record[FIRST_INPUT].append(self._blocks[b].input(args, kwargs).detach().float().cpu())

    def _strategy_call(self, blk: WrappedBlock, s: _Session, k: int, args, kwargs):
        b, strategy = blk.index, s.strategy
        if not blk.unit:
            out, frac = strategy.block(b, k, blk.original, args, kwargs)
            value = out
        else:  # the strategy sees the unit's residual; the model gets the unit's output
            made = []

            def run(*a, **kw):
                o = blk.original(*a, **kw)
                made.append((o, blk.value(o, a, kw)))
                return made[-1][1]

            value, frac = strategy.block(b, k, run, args, kwargs)
            out = made[-1][0] if made and value is made[-1][1] else blk.rebuild(value, args, kwargs)
        self._computed[b][k] += frac
        self._reused[b][k] += 1.0 - frac
        if self._record is not None and frac > 0:
            self._record_call(b, value, args, kwargs)
        return out

    # ------------------------------------------------------------------ calls within a step
    def _new_call(self, s: _Session) -> None:
        """A model call starts: the c-th call of a step uses the c-th cache (and strategy state)."""
        c = s.call + 1
        s.call = c
        if c == len(s.caches):
            s.caches.append([None] * len(self._blocks))
            s.fuseds.append([None] * len(self._fusion.layers))
            if self._strategy is not None:
                clone = copy.deepcopy(self._strategy)
                clone.begin(s.num_steps)
                s.strategies.append(clone)
        s.cache, s.fused = s.caches[c], s.fuseds[c]
        if s.strategies:
            s.strategy = s.strategies[c]

    # ------------------------------------------------------------------ detach
    def detach(self) -> None:
        """Remove every wrapper this engine set; the model's modules and methods are exactly as before ``attach``
        (a wrapper another tool set on top of one of ours stays; see ``bac.wrapping``)."""
        for entry in reversed(self._installed):
            uninstall(entry)
        self._installed.clear()
        self._session = None
        self._tracing = False
        self._detached = True

    # ------------------------------------------------------------------ schedule and cursor
    def _inputs(self) -> list[tuple[int | None, str | None]]:
        return [blk.in_arg for blk in self._blocks]

    def _apply_mask(self, schedule) -> None:
        mask = schedule.to_mask()  # (n_blocks, K) in schedule.blocks order
        index = {name: i for i, name in enumerate(schedule.blocks)}
        self._mask_list = [mask[index[b.name]].tolist() for b in self.blocks]
        self._fusion.apply_mask(self._mask_list)

    def set_schedule(self, schedule) -> None:
        """Use ``schedule`` (a ``bac.schedule.Schedule``), a ``bac.strategies.Strategy``, or ``None`` (compute
        every block every step). A strategy replaces the mask: it decides per block call (see its module)."""
        from bac.strategies import Strategy

        if self._session is not None:
            raise RuntimeError("cannot change the schedule inside a cache session")
        self._strategy = None
        if isinstance(schedule, Strategy):
            schedule.bind(self.blocks, self._inputs())
            self.schedule, self._mask_list, self._strategy = None, None, schedule
            return
        if schedule is None:
            self.schedule, self._mask_list = None, None
            return
        schedule.check_compatible(blocks=[b.name for b in self.blocks])
        self._apply_mask(schedule)
        self.schedule = schedule

    @contextmanager
    def session(self, num_steps: int) -> Iterator["CacheEngine"]:
        """One sampling run of ``num_steps`` steps; the cache is empty at its start and dropped at its end."""
        if self._detached:
            raise RuntimeError("this engine is detached; attach a new one")
        if self._session is not None:
            raise RuntimeError("a cache session is already open; sessions do not nest")
        if self._tracing and self._trace:  # a call outside any session (e.g. profile_flops) showed the order
            self._finish_trace()
        if self.schedule is not None:
            self.schedule.check_compatible(num_steps=num_steps)
        if num_steps > len(self._computed[0]):
            self._grow_stats(num_steps)
        strategy = self._strategy
        if strategy is not None:
            strategy.begin(num_steps)
        s = _Session(num_steps, self._mask_list, caches=[[None] * len(self.blocks)],
                     fuseds=[[None] * len(self._fusion.layers)], strategies=[strategy] if strategy is not None else [])
        self._session = s
        ok = False
        try:
            yield self
            ok = True
        finally:
            if self._tracing:
                if ok and self._trace:
                    self._finish_trace()
                else:
                    self._discard_trace()  # an interrupted first call shows no complete order
            self.peak_cache_bytes = max(self.peak_cache_bytes, s.cache_bytes)
            self._session = None
            self.n_sessions += 1
            for st in s.strategies:
                st.end()

    def step(self, k: int, t=None) -> None:
        """The sampler announces denoising step ``k`` (0-based) with timestep ``t`` before calling the model."""
        s = self._session
        if s is None:
            raise RuntimeError("engine.step() outside engine.session(); the sampler must open a session first")
        if not 0 <= k < s.num_steps:
            raise IndexError(f"step {k} is outside the session's {s.num_steps} steps")
        if self._tracing and self._trace:
            self._finish_trace()
        s.k, s.t, s.call = k, t, -1
        for st in s.strategies:
            st.step(k, t)

    @contextmanager
    def recording(self, first_input: bool = False, into=None) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Keep every block's cached value at every call (for calibration); use with no schedule (compute all).
        A value is the block's output (a unit's residual) as a float CPU tensor, several output tensors side by
        side (``bac.tree.detach_float_cpu``). With ``first_input``, also the stream entering the first block under
        the key ``bac.engine.FIRST_INPUT``. With several model calls per step, each call adds its own entry.
        ``into``: where to append instead of new lists (``into[name].append(value)``; a streaming reducer)."""
        self._record = into if into is not None else {b.name: [] for b in self.blocks}
        if first_input:
            self._record[FIRST_INPUT] = []
        try:
            yield self._record
        finally:
            self._record = None


def attach(model: nn.Module, schedule=None, blocks=None, fuse_layers: bool = True, layers: str | None = None,
           stack: str | None = None) -> CacheEngine:
    """Wrap ``model``'s blocks from outside and return the engine that drives them.

    ``blocks``: a declaration (``bac.blocks``: a pattern such as ``"decoder.layers.*.{sa_block,ca_block,ff_block}"``,
    a ``{pattern: kind}`` dict, a ``BlockSpec``, or a list of them), or ``None`` for the model's ``cache_blocks`` or
    the common layouts in ``DEFAULT_PATTERNS``. A callable already wrapped by another tool (diffusers hooks,
    cache-dit, another engine) is refused with ``WrapperConflict``.

    With ``fuse_layers`` and declared layers (``layers``, else the model's ``cache_layers``: modules whose forward
    returns its input plus the sum of its blocks' outputs), a layer whose blocks all reuse at a step is replaced by
    one add of their summed cached deltas: the same value up to float summation order, and fewer Python calls
    and tensor ops on the hot path. The declaration is checked on the first call (a gated residual is refused).
    A declared ``stack`` (else ``cache_stack``: the module whose forward runs those layers in order, each as
    ``x = layer(x, *args, **kwargs)``) has that loop run by the engine during a session, so a reused layer is
    that add alone, with no module call: bitwise the same result as the layer wrappers.
    """
    engine = CacheEngine(model, resolve_blocks(model, blocks), fuse_layers=fuse_layers, layers=layers, stack=stack)
    engine.set_schedule(schedule)
    return engine


_FINGERPRINTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def fingerprint(model: nn.Module) -> str:
    """A short hash of a model's parameters and buffers (names, shapes and values) to tie schedules to it.

    Any dtype (bf16, fp8: their bytes are hashed). Computed once per model and kept while no tensor of its state
    is replaced or changed in place (each tensor's storage and version counter are checked)."""
    state = model.state_dict(keep_vars=True)
    key = tuple((name, t.data_ptr(), t._version, tuple(t.shape), t.dtype) for name, t in state.items())
    hit = _FINGERPRINTS.get(model)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()[:16]
    _FINGERPRINTS[model] = (key, digest)
    return digest
