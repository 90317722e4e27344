"""Latency of several configs measured alike: interleaved rounds, warm-up rounds dropped, the device synchronised.

Every benchmark of the runtime (``eval/bench.py``, the frontier's latency phase, the budget tuner, the rollout's
own batch-1 timing) goes through ``time_interleaved``: in each round every config runs once, in order, so a slow
phase of the machine hits all of them alike, and only the call itself is inside the clock (attaching a cache,
making a warm-start guess or choosing the observation happen in ``before``/``after``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch


@dataclass
class Timed:
    """One config to time: ``run(r)`` is the timed call in round r; ``before(r)`` and ``after(r)`` run around it,
    off the clock (e.g. attach and detach a cache engine, so an uncached config runs with no engine at all)."""

    label: str
    run: Callable[[int], object]
    before: Callable[[int], object] | None = None
    after: Callable[[int], object] | None = None


def device_sync(device: torch.device | str | None) -> Callable[[], None] | None:
    """What to call before and after a timed call on ``device`` so that the clock sees its work (CUDA is
    asynchronous); None on the CPU."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return None


def time_interleaved(configs: Sequence[Timed], rounds: int, warmup: int = 2,
                     sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds per call of every config (label -> ``rounds`` samples): ``warmup + rounds`` rounds, each running
    every config once in the given order; the first ``warmup`` rounds are not kept."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"time_interleaved needs rounds >= 1 and warmup >= 0, got {rounds} and {warmup}")
    labels = [c.label for c in configs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"time_interleaved got configs with the same label: {labels}")
    times: dict[str, list[float]] = {c.label: [] for c in configs}
    for r in range(warmup + rounds):
        for c in configs:
            if c.before is not None:
                c.before(r)
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            c.run(r)
            if sync is not None:
                sync()
            elapsed = time.perf_counter() - t0
            if c.after is not None:
                c.after(r)
            if r >= warmup:
                times[c.label].append(elapsed)
    return times
