"""The literature's caching methods as strategies of the one cache engine.

A method is three choices, in the vocabulary of the caching literature: *where* (which features: a block, a
layer's blocks, the whole stack, some tokens, some channels), *when* (which steps recompute: a static mask, an
online indicator against a threshold) and *how* (what a skipped block returns: its last output, or a forecast
from its computed history). The engine owns the wrappers, the step cursor and the statistics; a strategy only
answers, for block ``b`` at step ``k``, "run it or not, and what to return" through :meth:`Strategy.block`.

Methods whose *when* is a static per-block mask and whose *how* is plain reuse (uniform/FORA, Δ-DiT, ProfilingDiT,
the ACS rows and BAC) are not strategies at all: they are ``bac.schedule.Schedule`` masks on the engine's fast
path. Everything else is here:

  MaskForecast   static mask + a forecaster (``bac.forecasters``) on skipped steps: TaylorSeer, FoCa, AB-Cache, HyCa, BAC+forecast,
                 ERTACache (its residual-linearisation correction is a fitted forecaster)
  TeaCache       whole-step skip while the accumulated, polynomially rescaled input change stays small
  FBCache        the first layer always runs; its residual's change decides whether the rest is reused
  BWCache        per layer: reuse while the layer's input changed little since it last ran, at most N steps
  ToCa           token-wise: on cached steps the FFN blocks recompute the most-changed tokens only

Online indicators reduce each sample to one number and take the *largest* over the batch: a step is skipped
only if every sample in the batch may skip it. That is conservative, but a batch's decision then depends on
its members (a vectorised evaluation of 50 episodes decides together), which per-block static methods avoid.
Each online decision needs the device to report a number to the host (``.item()``); its time is counted in
``stats()["decision_ms_per_step"]``.
"""
from __future__ import annotations

import copy
import time
from typing import Callable, Sequence

import numpy as np
import torch

from bac import tree
from bac.blocks import BlockInfo
from bac.forecasters import (AdamsBashforth, FoCa, Forecaster, HyCa, LinearCorrection, Reuse, Taylor,  # noqa: F401
                             combine, make_forecaster)

Run = Callable[..., torch.Tensor]


def rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Per-sample relative L1 change ``mean|cur - prev| / mean|prev|`` over all but the batch dim, shape (B,)."""
    dims = tuple(range(1, cur.dim()))
    return (cur - prev).abs().mean(dims) / prev.abs().mean(dims).clamp_min(1e-12)


class Strategy:
    """Base class; see the module docstring. Subclasses override ``block`` and, if they keep state, ``begin``."""

    name = "strategy"
    dynamic = False  # decisions depend on the data (an online indicator)

    def bind(self, blocks: Sequence[BlockInfo], inputs: Sequence[tuple[int | None, str | None]] | None = None) -> None:
        """Called by the engine with its blocks in the order they run (block ``b`` is ``blocks[b]``), again if the
        model's first call shows another order, and where each block's stream argument is (position, name)."""
        self.blocks = list(blocks)
        self.n_blocks = len(self.blocks)
        self._inputs = list(inputs) if inputs is not None else [(0, None)] * self.n_blocks
        self._decide_s = 0.0
        self._steps = 0

    def input(self, b: int, args: tuple, kwargs: dict) -> torch.Tensor:
        """The stream entering block ``b`` in this call (found through its call signature)."""
        pos, name = self._inputs[b]
        if pos is not None and pos < len(args):
            return args[pos]
        if name is None or name not in kwargs:
            raise ValueError(f"block {self.blocks[b].name} was called without its stream argument {name or pos!r}")
        return kwargs[name]

    def with_input(self, b: int, args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
        """``args, kwargs`` with block ``b``'s stream argument replaced by ``x``."""
        pos, name = self._inputs[b]
        if pos is not None and pos < len(args):
            return args[:pos] + (x,) + args[pos + 1:], kwargs
        return args, {**kwargs, name: x}

    def begin(self, num_steps: int) -> None:
        """A session (one sampling run of ``num_steps`` steps) starts: drop all per-run state."""
        self.num_steps = num_steps

    def end(self) -> None:
        """The session ended (also after an exception)."""

    def step(self, k: int, t) -> None:
        self._steps += 1

    def block(self, b: int, k: int, run: Run, args: tuple, kwargs: dict) -> tuple[torch.Tensor, float]:
        """Return block ``b``'s output at step ``k`` and the fraction of its work that ran (1.0 computed,
        0.0 reused or forecast, in between for token-wise partial compute). ``run(*args, **kwargs)`` runs it."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Knobs and fitted values, for the results' summary."""
        return {"strategy": self.name}

    def stats(self) -> dict:
        out = {}
        if self.dynamic:
            out["decision_ms_per_step"] = 1e3 * self._decide_s / max(self._steps, 1)
        return out


# ---------------------------------------------------------------------------------------------- strategies
class MaskForecast(Strategy):
    """Static per-block mask (a ``Schedule``) with a forecaster on the skipped steps.

    TaylorSeer, FoCa, AB-Cache and HyCa pair an interval mask with their forecaster; ``bac_forecast`` pairs
    BAC's calibrated per-block mask with one; ERTACache pairs its profiled whole-step mask with its linear
    correction. With a compute-everything mask it runs every block (the exactness reference).
    """

    name = "mask_forecast"

    def __init__(self, schedule, forecaster: Forecaster, name: str | None = None):
        self.schedule = schedule
        self.forecaster = forecaster
        if name:
            self.name = name

    def bind(self, blocks, inputs=None):
        super().bind(blocks, inputs)
        self.schedule.check_compatible(blocks=[b.name for b in blocks])
        mask = self.schedule.to_mask()
        index = {n: i for i, n in enumerate(self.schedule.blocks)}
        self.mask = [mask[index[b.name]].tolist() for b in self.blocks]

    def begin(self, num_steps):
        super().begin(num_steps)
        self.schedule.check_compatible(num_steps=num_steps)
        self.forecaster.reset(self.n_blocks)
        for f in getattr(self, "_more", ()):
            f.reset(self.n_blocks)
        self._seen = [False] * self.n_blocks
        self._shape: list = [None] * self.n_blocks  # a tuple output: its structure (forecast tensor by tensor)

    def _forecasters(self, n: int) -> list[Forecaster]:
        """One forecaster per output tensor (the j-th tensor of every block shares the j-th one)."""
        more = self.__dict__.setdefault("_more", [])
        while len(more) < n - 1:
            f = copy.deepcopy(self.forecaster)
            f.reset(self.n_blocks)
            more.append(f)
        return [self.forecaster] + more[: n - 1]

    def block(self, b, k, run, args, kwargs):
        if self.mask[b][k] or not self._seen[b]:
            out = run(*args, **kwargs)
            if isinstance(out, torch.Tensor):
                self.forecaster.push(b, k, out)
            else:
                ts = tree.tensors(out)
                for f, t in zip(self._forecasters(len(ts)), ts):
                    f.push(b, k, t)
                self._shape[b] = out
            self._seen[b] = True
            return out, 1.0
        if self._shape[b] is None:
            return self.forecaster.predict(b, k), 0.0
        fs = self._forecasters(len(tree.tensors(self._shape[b])))
        return tree.map_tensors(lambda _, f: f.predict(b, k), self._shape[b], fs), 0.0

    def describe(self):
        s = self.schedule
        return {"strategy": self.name, "mask": s.method, "n_updates": s.n_updates, "n_bubble": s.n_bubble,
                "computed_fraction": round(s.computed_fraction(), 4), **self.forecaster.describe()}


class _Reusing(Strategy):
    """Shared state of the online reuse strategies: the last computed output per block."""

    def begin(self, num_steps):
        super().begin(num_steps)
        self.cache: list[torch.Tensor | None] = [None] * self.n_blocks

    def end(self):
        self.cache = [None] * self.n_blocks

    def _compute(self, b, run, args, kwargs):
        out = run(*args, **kwargs)
        self.cache[b] = out
        return out, 1.0


class TeaCache(_Reusing):
    """TeaCache (CVPR 2025, ali-vilab/TeaCache): skip whole steps while the accumulated, rescaled input change is small.

    Indicator: ``d_k`` = relative L1 change of the stream entering the first block between consecutive steps
    (DP-T conditions on time through cross-attention, so its first block's input is the noisy-action stream
    itself rather than TeaCache's timestep-modulated input). ``A += P(d_k)`` with ``P`` a 4th-order polynomial
    fitted on our calibration trajectories (input change -> change of the whole stack's residual,
    ``bac.profiling.fit_teacache``); while ``A < delta`` every block reuses its output (= the cached residual of
    the stack added to the current input), else all compute and ``A = 0``. The first and the last step always
    compute. ``delta <= 0`` computes every step.
    """

    name = "teacache"
    dynamic = True

    def __init__(self, delta: float, coeffs: Sequence[float]):
        self.delta = float(delta)
        self.coeffs = np.asarray(coeffs, dtype=np.float64)

    def begin(self, num_steps):
        super().begin(num_steps)
        self.acc, self.prev_in, self.skip, self.skipped_steps = 0.0, None, False, []

    def block(self, b, k, run, args, kwargs):
        if b == 0:
            t0 = time.perf_counter()
            x = self.input(b, args, kwargs)
            if self.delta <= 0 or k in (0, self.num_steps - 1) or self.prev_in is None:
                self.skip = False
            else:
                d = float(rel_l1(x, self.prev_in).max())
                self.acc += max(float(np.polyval(self.coeffs, d)), 0.0)
                self.skip = self.acc < self.delta
            if not self.skip:
                self.acc = 0.0
            else:
                self.skipped_steps.append(k)
            self.prev_in = x
            self._decide_s += time.perf_counter() - t0
        if self.skip and self.cache[b] is not None:
            return self.cache[b], 0.0
        return self._compute(b, run, args, kwargs)

    def describe(self):
        return {"strategy": self.name, "delta": self.delta, "coeffs": self.coeffs.tolist()}


class FBCache(_Reusing):
    """First Block Cache (ParaAttention / diffusers ``FirstBlockCacheConfig``): the first layer always runs; if
    its residual (the sum of its blocks' outputs) changed by less than ``threshold`` (relative L1) since the
    last fully computed step, every later block reuses its output (= the cached tail residual), else all run
    and the reference residual is updated. ``threshold <= 0`` computes everything."""

    name = "fbcache"
    dynamic = True

    def __init__(self, threshold: float):
        self.threshold = float(threshold)

    def bind(self, blocks, inputs=None):
        super().bind(blocks, inputs)
        first = min(b.layer for b in self.blocks)
        self.first = [i for i, b in enumerate(self.blocks) if b.layer == first]
        self.decider = max(self.first)

    def begin(self, num_steps):
        super().begin(num_steps)
        self.ref, self.res, self.outs, self.skip = None, None, [], False

    def block(self, b, k, run, args, kwargs):
        if b in self.first:
            out, frac = self._compute(b, run, args, kwargs)
            self.outs = [out] if b == self.first[0] else self.outs + [out]
            if b == self.decider:
                t0 = time.perf_counter()
                self.res = tree.summed(self.outs)  # the first layer's residual (side by side for several streams)
                self.skip = (self.threshold > 0 and self.ref is not None
                             and float(rel_l1(self.res, self.ref).max()) < self.threshold)
                if not self.skip:
                    self.ref = self.res
                self._decide_s += time.perf_counter() - t0
            return out, frac
        if self.skip and self.cache[b] is not None:
            return self.cache[b], 0.0
        return self._compute(b, run, args, kwargs)

    def describe(self):
        return {"strategy": self.name, "threshold": self.threshold}


class BWCache(_Reusing):
    """BWCache (arXiv 2509.13789, block-wise caching for video DiTs): per DiT block (here: per layer, its attention,
    cross-attention and FFN branches together), reuse while the layer's input changed by less than
    ``threshold`` (relative L1) since the step the layer last computed, for at most ``max_reuse`` steps in a
    row. The input is what the layer would see, so the indicator costs no block computation; it costs one
    host sync per layer and step. ``threshold <= 0`` computes everything."""

    name = "bwcache"
    dynamic = True

    def __init__(self, threshold: float, max_reuse: int = 5):
        self.threshold = float(threshold)
        self.max_reuse = int(max_reuse)

    def bind(self, blocks, inputs=None):
        super().bind(blocks, inputs)
        layers = sorted({b.layer for b in self.blocks})
        self.layer_of = [layers.index(b.layer) for b in self.blocks]
        self.head = [i == 0 or self.blocks[i - 1].layer != b.layer for i, b in enumerate(self.blocks)]
        self.n_layers = len(layers)

    def begin(self, num_steps):
        super().begin(num_steps)
        self.ref = [None] * self.n_layers
        self.age = [0] * self.n_layers
        self.skip = [False] * self.n_layers

    def block(self, b, k, run, args, kwargs):
        li = self.layer_of[b]
        if self.head[b]:
            t0 = time.perf_counter()
            x = self.input(b, args, kwargs)
            ok = (self.threshold > 0 and self.ref[li] is not None and self.age[li] < self.max_reuse
                  and float(rel_l1(x, self.ref[li]).max()) < self.threshold)
            self.skip[li] = ok
            if ok:
                self.age[li] += 1
            else:
                self.ref[li], self.age[li] = x, 0
            self._decide_s += time.perf_counter() - t0
        if self.skip[li] and self.cache[b] is not None:
            return self.cache[b], 0.0
        return self._compute(b, run, args, kwargs)

    def describe(self):
        return {"strategy": self.name, "threshold": self.threshold, "max_reuse": self.max_reuse}


class ToCa(_Reusing):
    """ToCa (arXiv 2410.05317, ICLR 2025, token-wise caching): every ``interval`` steps all blocks compute; in between,
    token-wise blocks (FFNs: each token's output depends on that token alone) recompute the ``ratio`` of tokens
    whose input changed most since their cached output was made, plus a bonus ``freq_weight * age / interval``
    for tokens cached longest (ToCa's cache-frequency score), and reuse the rest; attention blocks reuse.
    ToCa's attention-map scores need the attention weights, which a generic hook does not see, so the score
    is the input change (one of the scores ToCa's code offers). At DP-T's 16 action tokens there is little
    to gain (research notes §7): measured, not assumed."""

    name = "toca"

    def __init__(self, interval: int, ratio: float = 0.3, freq_weight: float = 0.25):
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        self.interval, self.ratio, self.freq_weight = int(interval), float(ratio), float(freq_weight)

    def begin(self, num_steps):
        super().begin(num_steps)
        self.inp: list[torch.Tensor | None] = [None] * self.n_blocks
        self.age: list[torch.Tensor | None] = [None] * self.n_blocks
        self.tokenwise = [False] * self.n_blocks

    def block(self, b, k, run, args, kwargs):
        full = k % self.interval == 0 or self.cache[b] is None
        if full:
            out, frac = self._compute(b, run, args, kwargs)
            if self.blocks[b].kind == "ffn":
                x = self.input(b, args, kwargs)
                # token-wise: a (B, T, C) stream in, one output tensor per token out
                self.tokenwise[b] = isinstance(out, torch.Tensor) and x.dim() == 3 and out.shape[:2] == x.shape[:2]
                if self.tokenwise[b]:
                    self.inp[b] = x
                    self.age[b] = torch.zeros(out.shape[:2], device=out.device)
            return out, frac
        if not self.tokenwise[b] or self.ratio == 0.0:
            return self.cache[b], 0.0
        x = self.input(b, args, kwargs)  # (B, T, C)
        T = x.shape[1]
        r = max(1, int(round(self.ratio * T)))
        self.age[b] = self.age[b] + 1
        score = (x - self.inp[b]).norm(dim=-1) / self.inp[b].norm(dim=-1).clamp_min(1e-12)
        score = score + self.freq_weight * self.age[b] / self.interval
        idx = score.topk(r, dim=1).indices  # (B, r)
        gather = idx[..., None].expand(-1, -1, x.shape[-1])
        a, kw = self.with_input(b, args, kwargs, x.gather(1, gather))
        fresh = run(*a, **kw)  # (B, r, C)
        out = self.cache[b].scatter(1, gather, fresh)
        self.cache[b] = out
        self.inp[b] = self.inp[b].scatter(1, gather, x.gather(1, gather))
        self.age[b] = self.age[b].scatter(1, idx, 0.0)
        return out, r / T

    def describe(self):
        return {"strategy": self.name, "interval": self.interval, "ratio": self.ratio, "freq_weight": self.freq_weight}
