"""Forecasters: what a skipped block returns, predicted from its outputs at the steps where it computed.

Plain reuse (FORA, BAC), TaylorSeer's finite-difference expansion, Adams-Bashforth, FoCa's BDF2 + Heun, HyCa's
per-channel-group choice and ERTACache's fitted linear correction. ``bac.strategies.MaskForecast`` pairs one with
a static mask; ``make_forecaster`` builds one by name.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch


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
