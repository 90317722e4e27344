"""The engine's first call with a model: the order in which blocks run and their depth, measured, not parsed.

A name says little about execution order on models with several stacks (Flux's double- then single-stream blocks,
Latte's interleaved spatial and temporal blocks). So the first model call with the engine attached computes every
block and records the order they run in; the engine then re-indexes its blocks to that order, with the depth of
a block the rank of the module holding it, and replays what that call computed into the session's cache or
strategy, so a result never depends on when the order became known. ``OrderTrace`` is a part of
``bac.engine.CacheEngine`` (a mixin over its state).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from bac import tree
from bac.blocks import BlockInfo

if TYPE_CHECKING:
    from bac.blockcall import WrappedBlock

FIRST_INPUT = "<first block input>"  # recording key of the stream entering the first block


class OrderTrace:
    """The first-call trace of ``bac.engine.CacheEngine``: see the module docstring."""

    def _traced_call(self, blk: WrappedBlock, args, kwargs):
        first = not self._trace
        self._trace.append(blk.index)
        self._trace_seen.add(blk.index)
        out = self._counted(blk, args, kwargs) if self._flop_mode is not None else blk.original(*args, **kwargs)
        value = blk.value(out, args, kwargs)
        self._trace_value[blk.index] = value
        if self._session is not None:
            self._trace_log.append((blk, args, kwargs, value))
        if self._record is not None:
            self._record[blk.found.info.name].append(tree.detach_float_cpu(value))
            if first and FIRST_INPUT in self._record:
                self._record[FIRST_INPUT].append(blk.input(args, kwargs).detach().float().cpu())
        return out

    def _discard_trace(self) -> None:
        self._trace, self._trace_log, self._trace_value = [], [], {}
        self._trace_seen = set()

    def _finish_trace(self, again: bool = False) -> None:
        """Fix the order and depth the first call showed, then give the session what that call computed."""
        order, log = self._trace, self._trace_log
        self._tracing = False
        self._discard_trace()
        self._fusion.finish_trace()
        if self._reindex(order) and self._strategy is not None:
            st = self._strategy
            spent = st._decide_s, st._steps
            st.bind(self.blocks, self._inputs())
            st._decide_s, st._steps = spent
        if self.schedule is not None:
            self._apply_mask(self.schedule)  # re-indexed rows, and only verified layers fuse
        fusion = self._fusion
        self._entry_block = -1 if fusion.stack is not None or fusion.layer_of[0] is not None else 0
        self._entry_layer = fusion.entry_layer()
        s = self._session
        if s is None:
            return
        s.mask = self._mask_list
        s.call, s.cache, s.fused, s.strategy = 0, s.caches[0], s.fuseds[0], (s.strategies[0] if s.strategies else None)
        k = s.k
        for blk, args, kwargs, value in log:  # the first call computed every block: replay it into the state
            b = blk.index
            if s.strategy is not None:
                got, frac = s.strategy.block(b, k, lambda *a, _v=value, **kw: _v, args, kwargs)
                if got is not value or frac != 1.0:
                    raise RuntimeError(f"strategy {s.strategy.name} did not compute block {self.blocks[b].name} at the "
                                       "first model call of a session; a strategy must compute what it has not seen")
            elif s.mask is not None:
                s.cache_bytes += tree.nbytes(value)
                s.cache[b] = value
            self._computed[b][k] += 1
        if again:
            self._new_call(s)

    def _reindex(self, order: list[int]) -> bool:
        """Put the blocks in ``order`` (blocks that did not run go last) with depths from it; True if anything moved."""
        called = set(order)
        order = list(order) + [b for b in range(len(self._blocks)) if b not in called]
        depth: dict[int, int] = {}
        infos = []
        for b in order:
            f = self._blocks[b].found
            infos.append(BlockInfo(f.info.name, depth.setdefault(id(f.layer), len(depth)), f.info.kind))
        if infos == self.blocks:
            return False
        self._blocks = [self._blocks[b] for b in order]
        for i, blk in enumerate(self._blocks):
            blk.index = i
        self.blocks = infos
        self._computed = [self._computed[b] for b in order]
        self._reused = [self._reused[b] for b in order]
        self.block_flops = self.block_flops[order]
        self._fusion.reindex({old: new for new, old in enumerate(order)})
        return True

    def trace(self, forward: Callable[[], object]) -> list[BlockInfo]:
        """Run ``forward()`` (one model call, no session, no grad) if the block order is not known yet, and return
        the blocks in the order they run, with their depth: what order-aware schedules (Δ-DiT, the Bubbling Union)
        must be built from."""
        if self._tracing:
            if self._session is not None:
                raise RuntimeError("trace() inside a cache session")
            with torch.no_grad():
                forward()
            if self._trace:
                self._finish_trace()
        return list(self.blocks)
