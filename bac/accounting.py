"""What the cache engine ran and what it cost: computed/reused block calls per step, FLOPs, cache memory.

A mixin of ``bac.engine.CacheEngine`` (it reads the engine's blocks, fused layers, schedule and strategy).
Counts are plain lists on the hot path (a list item add costs a tenth of a numpy item add), read as float
arrays (a token-wise strategy computes a fraction of a block).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch


class Accounting:
    def reset_stats(self, num_steps: int = 1) -> None:
        self._computed = [[0.0] * num_steps for _ in self.blocks]
        self._reused = [[0.0] * num_steps for _ in self.blocks]
        self._fusion.reset_stats(num_steps)  # whole fused layers: one count each
        self.peak_cache_bytes = 0
        self.n_sessions = 0

    def _grow_stats(self, num_steps: int) -> None:
        for rows in (self._computed, self._reused, self._fusion.reused):
            for row in rows:
                row.extend([0.0] * (num_steps - len(row)))

    @property
    def computed(self) -> np.ndarray:
        """Block calls computed, [n_blocks, steps], summed over sessions and model calls (fractions for
        token-wise strategies)."""
        return np.array(self._computed, dtype=np.float64).reshape(len(self.blocks), -1)

    @property
    def reused(self) -> np.ndarray:
        """Block calls served from the cache, [n_blocks, steps], summed over sessions and model calls."""
        out = np.array(self._reused, dtype=np.float64).reshape(len(self.blocks), -1)
        for (_, idxs), counts in zip(self._fusion.layers, self._fusion.reused):
            out[idxs] += np.asarray(counts, dtype=np.float64)  # a fused layer's reuse is each of its blocks'
        return out

    def profile_flops(self, forward: Callable[[], object]) -> dict:
        """Count matmul FLOPs of one uncached model call, per block and in total (torch's FlopCounterMode).

        Attention score products are counted where torch counts them (CUDA kernels), not on the CPU;
        at DP-T sizes they are under 2% of a block. Returns {"total", "blocks", "by_kind"} per model call.
        The call also shows the block order, if the engine has not seen the model run yet.
        """
        from torch.utils.flop_counter import FlopCounterMode

        if self._session is not None:
            raise RuntimeError("profile_flops() inside a cache session")
        with FlopCounterMode(display=False) as mode:
            self._flop_mode = mode
            try:
                with torch.no_grad():
                    forward()
            finally:
                self._flop_mode = None
        if self._tracing and self._trace:
            self._finish_trace()
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
