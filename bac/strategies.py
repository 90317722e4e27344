"""The literature's caching methods as strategies of the one cache engine.

A method is three choices, in the vocabulary of the caching literature: *where* (which features: a block, a
layer's blocks, the whole stack, some tokens, some channels), *when* (which steps recompute: a static mask, an
online indicator against a threshold) and *how* (what a skipped block returns: its last output, or a forecast
from its computed history). The engine owns the wrappers, the step cursor and the statistics; a strategy only
answers, for block ``b`` at step ``k``, "run it or not, and what to return" through :meth:`Strategy.block`.

Methods whose *when* is a static per-block mask and whose *how* is plain reuse (uniform/FORA, Δ-DiT, ProfilingDiT,
the ACS rows and BAC) are not strategies at all: they are ``bac.schedule.Schedule`` masks on the engine's fast
path. Everything else is here:

  MaskForecast   static mask + a forecaster on skipped steps: TaylorSeer, FoCa, AB-Cache, HyCa, BAC+forecast,
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

import math
import time
from typing import Callable, Sequence

import numpy as np
import torch

from bac.blocks import BlockInfo

Run = Callable[..., torch.Tensor]


def rel_l1(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Per-sample relative L1 change ``mean|cur - prev| / mean|prev|`` over all but the batch dim, shape (B,)."""
    dims = tuple(range(1, cur.dim()))
    return (cur - prev).abs().mean(dims) / prev.abs().mean(dims).clamp_min(1e-12)


class Strategy:
    """Base class; see the module docstring. Subclasses override ``block`` and, if they keep state, ``begin``."""

    name = "strategy"
    dynamic = False  # decisions depend on the data (an online indicator)

    def bind(self, blocks: Sequence[BlockInfo]) -> None:
        """Called once by the engine with its blocks, in the engine's order (block ``b`` is ``blocks[b]``)."""
        self.blocks = list(blocks)
        self.n_blocks = len(self.blocks)
        self._decide_s = 0.0
        self._steps = 0

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


# ---------------------------------------------------------------------------------------------- forecasters
class Forecaster:
    """Predicts a block's output at a skipped step from its outputs at the steps where it computed.

    ``push(b, k, F)`` at every computed step, ``predict(b, k)`` at skipped ones; ``reset(n_blocks)`` per session.
    Linear in the features: forecasting a sum is the sum of the forecasts, so residual deltas forecast well.
    """

    name = "reuse"
    order = 0  # computed points kept beyond the last one

    def reset(self, n_blocks: int) -> None:
        self.hist: list[list[tuple[int, torch.Tensor]]] = [[] for _ in range(n_blocks)]

    def push(self, b: int, k: int, F: torch.Tensor) -> None:
        h = self.hist[b]
        h.append((k, F))
        if len(h) > self.order + 1:
            del h[0]

    def predict(self, b: int, k: int) -> torch.Tensor:
        return self.hist[b][-1][1]

    def describe(self) -> dict:
        return {"forecaster": self.name}


def combine(terms: list[tuple[float, torch.Tensor]]) -> torch.Tensor:
    """``Σ c_i T_i`` in as few tensor ops as possible (one multiply, then fused multiply-adds): at DP-T sizes a
    forecast's elementwise ops cost about as much as the block it replaces, so they are kept minimal."""
    terms = [(c, t) for c, t in terms if c != 0.0]
    if not terms:
        raise ValueError("nothing to combine")
    c0, t0 = terms[0]
    out = t0 * c0 if c0 != 1.0 else t0.clone() if len(terms) > 1 else t0
    for c, t in terms[1:]:
        out.add_(t, alpha=c)
    return out


class Reuse(Forecaster):
    """Plain reuse of the last computed output (FORA, BAC)."""


class Taylor(Forecaster):
    """TaylorSeer (arXiv 2503.06923, ICCV 2025): ``F(k) ≈ Σ_{i≤m} D^i (k - k_last)^i / i!`` where the
    derivative estimates are recursive divided differences over the computed steps,
    ``D^0 = F(k_last)``, ``D^{i+1} = (D^i(k_last) - D^i(k_prev)) / (k_last - k_prev)``. Only the orders that the
    history supports are used (order 0 = reuse right after the first computed step)."""

    name = "taylor"

    def __init__(self, order: int = 1):
        if order < 0:
            raise ValueError(f"Taylor order must be >= 0, got {order}")
        self.order = order

    def reset(self, n_blocks: int) -> None:
        self.derivs: list[list[torch.Tensor] | None] = [None] * n_blocks
        self.last_k: list[int] = [0] * n_blocks

    def push(self, b: int, k: int, F: torch.Tensor) -> None:
        old = self.derivs[b]
        new = [F]
        if old is not None and k > self.last_k[b]:
            gap = float(k - self.last_k[b])
            for i in range(min(self.order, len(old))):
                new.append((new[i] - old[i]) / gap)
        self.derivs[b], self.last_k[b] = new, k

    def predict(self, b: int, k: int) -> torch.Tensor:
        d = self.derivs[b]
        s = float(k - self.last_k[b])
        return combine([(s**i / math.factorial(i), d[i]) for i in range(len(d))])

    def describe(self) -> dict:
        return {"forecaster": self.name, "order": self.order}


class AdamsBashforth(Forecaster):
    """AB-Cache (arXiv 2504.10540): k-th order Adams-Bashforth over the computed outputs. With slopes
    ``g_j = (F_j - F_{j-1}) / (k_j - k_{j-1})`` between consecutive computed steps, the skipped step at distance
    ``s`` is ``F_last + s * Σ_i β_i g_{last-i}`` with the AB weights (1), (3/2, -1/2), (23, -16, 5)/12, ...
    for order 1, 2, 3; lower orders while the history is short."""

    name = "adams_bashforth"
    WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

    def __init__(self, order: int = 2):
        if order not in self.WEIGHTS:
            raise ValueError(f"Adams-Bashforth order must be one of {sorted(self.WEIGHTS)}, got {order}")
        self.order = order

    def predict(self, b: int, k: int) -> torch.Tensor:
        h = self.hist[b]
        k_last, F_last = h[-1]
        n = min(self.order, len(h) - 1)
        if n == 0:
            return F_last
        s = float(k - k_last)
        coef = [0.0] * len(h)  # on h[j][1]
        coef[-1] = 1.0
        for i, beta in enumerate(self.WEIGHTS[n]):
            j1, j0 = len(h) - 1 - i, len(h) - 2 - i
            w = s * beta / (h[j1][0] - h[j0][0])
            coef[j1] += w
            coef[j0] -= w
        return combine([(c, h[j][1]) for j, c in enumerate(coef)][::-1])

    def describe(self) -> dict:
        return {"forecaster": self.name, "order": self.order}


class FoCa(Forecaster):
    """FoCa (arXiv 2508.16211, "forecast then calibrate"): the block output as a feature ODE ``dF/dk = g``.

    Predictor: the variable-step BDF2 derivative at the last computed step,
    ``g_2 = ((1+2w) F_2 - (1+w)^2 F_1 + w^2 F_0) / (h_2 (1+w))`` with ``h_i`` the gaps and ``w = h_2 / h_1``.
    Corrector (Heun / trapezoid): ``F(k) = F_2 + e/2 (g_2 + g_e)``, the slope at the forecast point
    ``g_e = g_2 + c min(e, h_2)`` extrapolated from the slope's trend ``c`` for at most one computed interval,
    which keeps long skips from running away (the paper's argument against high-order Taylor). The paper's
    exact coefficients are not public in our sources; this is our reading of it. Two points: linear; one: reuse.
    """

    name = "foca"
    order = 2

    def predict(self, b: int, k: int) -> torch.Tensor:
        h = self.hist[b]
        k2, F2 = h[-1]
        e = float(k - k2)
        if len(h) == 1:
            return F2
        k1, F1 = h[-2]
        h2 = float(k2 - k1)
        if len(h) == 2:
            return combine([(1.0 + e / h2, F2), (-e / h2, F1)])
        k0, F0 = h[-3]
        h1 = float(k1 - k0)
        w = h2 / h1
        # pred = F2 + A g2 - B g1 with g2 the BDF2 slope, g1 = (F2 - F1) / h2 and the slope's trend
        # (g2 - g1) / (h2 / 2) applied over min(e, h2): A = e + e m / h2, B = e m / h2 (linear in F0, F1, F2)
        m = min(e, h2)
        B = e * m / h2
        A = e + B
        q = h2 * (1 + w)
        return combine([(1.0 + A * (1 + 2 * w) / q - B / h2, F2), (-A * (1 + w) ** 2 / q + B / h2, F1),
                        (A * w**2 / q, F0)])


class HyCa(Forecaster):
    """HyCa (arXiv 2510.04188, hybrid ODE solvers per feature dimension): each block's channels are split into groups by
    their dynamics offline, and each group gets the solver from a pool that forecast it best on calibration
    trajectories (``bac.profiling.fit_hyca``). Online, every solver used by a block forecasts and the channels
    are taken from their group's solver. ``assign[b]``: (C,) solver index per channel of block ``b``."""

    name = "hyca"

    def __init__(self, pool: Sequence[Forecaster], assign: Sequence[Sequence[int]]):
        self.pool = list(pool)
        self.assign = [torch.as_tensor(np.asarray(a), dtype=torch.long) for a in assign]
        self.order = max(f.order for f in self.pool)
        # per block: (solver, channel mask) of every solver it uses; the first one is the base of the forecast
        self.groups = [[(s, a == s) for s in torch.unique(a).tolist()] for a in self.assign]

    def reset(self, n_blocks: int) -> None:
        if len(self.assign) != n_blocks:
            raise ValueError(f"HyCa assignment covers {len(self.assign)} blocks, the engine has {n_blocks}")
        for f in self.pool:
            f.reset(n_blocks)

    def push(self, b: int, k: int, F: torch.Tensor) -> None:
        for f in self.pool:
            f.push(b, k, F)

    def predict(self, b: int, k: int) -> torch.Tensor:
        (s0, _), *rest = self.groups[b]
        out = self.pool[s0].predict(b, k)
        for s, m in rest:
            if m.device != out.device:  # once per block and device
                m = m.to(out.device)
                self.groups[b] = [(t, m if t == s else mt) for t, mt in self.groups[b]]
            out = torch.where(m, self.pool[s].predict(b, k), out)
        return out

    def describe(self) -> dict:
        counts = np.bincount(np.concatenate([a.numpy() for a in self.assign]), minlength=len(self.pool))
        return {"forecaster": self.name, "pool": [f.describe() for f in self.pool],
                "channels_per_solver": counts.tolist()}


class LinearCorrection(Forecaster):
    """ERTACache's residual linearisation (arXiv 2508.21091): a skipped step returns the last computed output
    plus a fitted fraction of the linear trend, ``F_last + α[b, k] (k - k_last) (F_last - F_prev) / gap``, with
    ``α`` per block and step fitted in closed form (least squares) on calibration trajectories
    (``bac.profiling.fit_erta``)."""

    name = "linear_correction"
    order = 1

    def __init__(self, alpha: np.ndarray):
        self.alpha = np.asarray(alpha, dtype=np.float64)  # (n_blocks, K)

    def predict(self, b: int, k: int) -> torch.Tensor:
        h = self.hist[b]
        k1, F1 = h[-1]
        a = float(self.alpha[b, k]) if k < self.alpha.shape[1] else 0.0
        if len(h) == 1 or a == 0.0:
            return F1
        k0, F0 = h[-2]
        c = a * (k - k1) / (k1 - k0)
        return combine([(1.0 + c, F1), (-c, F0)])


FORECASTERS = {"reuse": Reuse, "taylor": Taylor, "adams_bashforth": AdamsBashforth, "foca": FoCa}


def make_forecaster(name: str, order: int = 1) -> Forecaster:
    if name not in FORECASTERS:
        raise ValueError(f"unknown forecaster {name!r}; known: {sorted(FORECASTERS)}")
    cls = FORECASTERS[name]
    return cls(order) if name in ("taylor", "adams_bashforth") else cls()


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

    def bind(self, blocks):
        super().bind(blocks)
        self.schedule.check_compatible(blocks=[b.name for b in blocks])
        mask = self.schedule.to_mask()
        index = {n: i for i, n in enumerate(self.schedule.blocks)}
        self.mask = [mask[index[b.name]].tolist() for b in self.blocks]

    def begin(self, num_steps):
        super().begin(num_steps)
        self.schedule.check_compatible(num_steps=num_steps)
        self.forecaster.reset(self.n_blocks)
        self._seen = [False] * self.n_blocks

    def block(self, b, k, run, args, kwargs):
        if self.mask[b][k] or not self._seen[b]:
            out = run(*args, **kwargs)
            self.forecaster.push(b, k, out)
            self._seen[b] = True
            return out, 1.0
        return self.forecaster.predict(b, k), 0.0

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
            x = args[0]
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

    def bind(self, blocks):
        super().bind(blocks)
        first = min(b.layer for b in self.blocks)
        self.first = [i for i, b in enumerate(self.blocks) if b.layer == first]
        self.decider = max(self.first)

    def begin(self, num_steps):
        super().begin(num_steps)
        self.ref, self.res, self.skip = None, None, False

    def block(self, b, k, run, args, kwargs):
        if b in self.first:
            out, frac = self._compute(b, run, args, kwargs)
            self.res = out if b == self.first[0] else self.res + out
            if b == self.decider:
                t0 = time.perf_counter()
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

    def bind(self, blocks):
        super().bind(blocks)
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
            x = args[0]
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

    def block(self, b, k, run, args, kwargs):
        full = k % self.interval == 0 or self.cache[b] is None
        if full:
            out, frac = self._compute(b, run, args, kwargs)
            if self.blocks[b].kind == "ffn":
                self.inp[b] = args[0]
                self.age[b] = torch.zeros(out.shape[:2], device=out.device)
            return out, frac
        if self.blocks[b].kind != "ffn" or self.ratio == 0.0 or args[0].dim() != 3:
            return self.cache[b], 0.0
        x = args[0]  # (B, T, C)
        T = x.shape[1]
        r = max(1, int(round(self.ratio * T)))
        self.age[b] = self.age[b] + 1
        score = (x - self.inp[b]).norm(dim=-1) / self.inp[b].norm(dim=-1).clamp_min(1e-12)
        score = score + self.freq_weight * self.age[b] / self.interval
        idx = score.topk(r, dim=1).indices  # (B, r)
        gather = idx[..., None].expand(-1, -1, x.shape[-1])
        fresh = run(x.gather(1, gather), *args[1:], **kwargs)  # (B, r, C)
        out = self.cache[b].scatter(1, gather, fresh)
        self.cache[b] = out
        self.inp[b] = self.inp[b].scatter(1, gather, x.gather(1, gather))
        self.age[b] = self.age[b].scatter(1, idx, 0.0)
        return out, r / T

    def describe(self):
        return {"strategy": self.name, "interval": self.interval, "ratio": self.ratio, "freq_weight": self.freq_weight}
