"""The latency-budget rule of eval/tune.py and loop.budget_ms with a cache method (bac.frontier.choose_updates)."""
from __future__ import annotations

import pytest

from bac.frontier import choose_updates as choose


def row(cache, S, p95):
    return {"cache": cache, "n_updates": S, "latency_ms": {"p50": p95 * 0.9, "p95": p95, "p99": p95}}


ROWS = [row("none", 100, 600.0), row("bac", 5, 60.0), row("bac", 10, 110.0), row("bac", 20, 190.0)]


@pytest.mark.parametrize("budget,expect", [(50, (5, False)), (100, (5, True)), (150, (10, True)), (200, (20, True)),
                                           (1000, (100, True))])
def test_largest_s_within_budget(budget, expect):
    c = choose(ROWS, budget)
    assert (c["n_updates"], c["meets_budget"]) == expect
    assert c["cache"] == ("none" if expect[0] == 100 else "bac")


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        choose(ROWS, 0)
