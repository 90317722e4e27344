"""The success-latency frontier: which configs are worth running, and which one fits a latency budget.

A config (a sampler, its step count K, a cache method and its knobs) is a point of cost (batch-1 latency of one
action chunk) and value (rollout success rate). These rules know nothing of models or caches: ``eval/frontier.py``
measures the points, ``eval/tune.py`` and ``loop.budget_ms`` choose among them (``choose_for_budget`` over the
frontier; ``choose_updates`` for one cache method's budget S).
"""
from __future__ import annotations

from typing import Callable, Sequence

from bac.metrics import wilson_interval


def pareto(costs: Sequence[float], values: Sequence[float]) -> list[int]:
    """Indices of the points no other point dominates (at most the cost and at least the value, strictly better
    in one), in order of increasing cost. Equal points are all kept."""
    idx = sorted(range(len(costs)), key=lambda i: (costs[i], -values[i]))
    front, best = [], float("-inf")
    for i in idx:
        if values[i] > best or (front and costs[i] == costs[front[-1]] and values[i] == values[front[-1]]):
            front.append(i)
            best = max(best, values[i])
    return front


def choose_for_budget(rows: Sequence[dict], budget_ms: float, latency: Callable[[dict], float],
                      successes: Callable[[dict], tuple[int, int]]) -> dict:
    """The config to run under a latency budget: among ``rows`` whose ``latency(row)`` (p95 ms) meets
    ``budget_ms``, the one with the highest measured success rate (``successes(row)`` is (successes,
    episodes)), the faster one on a tie. Returns ``{"row", "meets_budget", "candidates"}``; where no row meets
    the budget, the fastest row with ``meets_budget`` False, so the caller can say so."""
    if not budget_ms > 0:
        raise ValueError(f"the latency budget must be positive, got {budget_ms} ms")
    if not rows:
        raise ValueError("no measured configs to choose from")
    ok = [r for r in rows if latency(r) <= budget_ms]
    if not ok:
        return {"row": min(rows, key=latency), "meets_budget": False, "candidates": []}
    best = max(ok, key=lambda r: (successes(r)[0] / successes(r)[1], -latency(r)))
    return {"row": best, "meets_budget": True, "candidates": ok}


def choose_updates(rows: Sequence[dict], budget_ms: float) -> dict:
    """One cache method's budget S for a latency budget: among ``rows`` ({"n_updates", "latency_ms": {"p95"}, ...},
    the uncached policy with n_updates = K among them), the one with the most computed steps whose p95 meets
    ``budget_ms``; if none does, the fastest row with ``meets_budget`` False (so the caller can say so)."""
    if not budget_ms > 0:
        raise ValueError(f"the latency budget must be positive, got {budget_ms} ms")
    if not rows:
        raise ValueError("no timed configs to choose from")
    ok = [r for r in rows if r["latency_ms"]["p95"] <= budget_ms]
    if ok:
        return dict(max(ok, key=lambda r: r["n_updates"]), meets_budget=True)
    return dict(min(rows, key=lambda r: r["latency_ms"]["p95"]), meets_budget=False)


def pooled(successes: Sequence[int], episodes: Sequence[int]) -> dict:
    """Success pooled over seed sets: {"successes", "episodes", "rate", "ci95"} (95% Wilson interval)."""
    s, n = int(sum(successes)), int(sum(episodes))
    lo, hi = wilson_interval(s, n)
    return {"successes": s, "episodes": n, "rate": s / n if n else float("nan"), "ci95": [round(lo, 4), round(hi, 4)]}
