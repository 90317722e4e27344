"""The frontier's grid: a ``Cell`` is a sampler at K steps, uncached or with a cache's knobs, or warm-started.

``grid`` builds the cells of ``configs/frontier/*.yaml``; ``cell_of`` reads one back from a frontier row. Shared by
eval/frontier.py (which measures the cells), eval/frontier_report.py and eval/tune.py (which choose among them).
"""
from __future__ import annotations

from dataclasses import dataclass

from omegaconf import OmegaConf

from eval.common import method_defaults

CALIBRATED = ("unified_acs", "blockwise_acs", "bac", "profiling", "bac_forecast")


@dataclass(frozen=True)
class Cell:
    """One config of the grid: a sampler at K steps, uncached (``cache`` empty) or with a cache's knobs."""

    sampler: str
    K: int
    cache: tuple = ()  # sorted (knob, value) pairs, "name" among them
    start: int = 0  # warm start: each chunk starts from the previous one at step k0 = start (loop.warm_start)

    @property
    def name(self) -> str:
        return dict(self.cache).get("name", "none")

    @property
    def label(self) -> str:
        base = f"{self.sampler}-{self.K}" + (f"@k{self.start}" if self.start else "")
        if not self.cache:
            return base
        knobs = ",".join(f"{k}={v}" for k, v in self.cache if k != "name")
        return f"{base}+{self.name}" + (f"[{knobs}]" if knobs else "")

    def cache_cfg(self) -> dict:
        """The full cache config (the method's yaml defaults, then this cell's knobs)."""
        return {**method_defaults(self.name), **dict(self.cache)}


def cell_of(row: dict) -> Cell:
    """The cell a frontier row (``frontier.json``, ``latency.json``) describes."""
    return Cell(str(row["sampler"]), int(row["K"]), tuple(sorted(row.get("knobs", {}).items())), int(row.get("start", 0)))


def grid(fc) -> list[Cell]:
    """The cells of ``cfg.frontier``: uncached at every (sampler, K), then every cache on ``cached_on``."""
    cells = [Cell(s, int(K)) for s, Ks in fc.samplers.items() for K in Ks]
    for pair in fc.cached_on:
        sampler, K = parse_pair(pair)
        for entry in fc.caches:
            knobs = dict(OmegaConf.to_container(entry, resolve=True)) if not isinstance(entry, dict) else dict(entry)
            keep = knobs.pop("keep", None)
            if keep is not None:
                if not 0 < float(keep) <= 1:
                    raise ValueError(f"frontier.caches: keep must be in (0, 1], got {keep} in {entry}")
                knobs["n_updates"] = max(1, round(float(keep) * K))
            cells.append(Cell(sampler, K, tuple(sorted(knobs.items()))))
    for pair in fc.get("warm_on", []):
        sampler, K = parse_pair(pair)
        for keep in fc.get("warm_keep", []):
            if not 0 < float(keep) < 1:
                raise ValueError(f"frontier.warm_keep: the share of steps run must be in (0, 1), got {keep}")
            cells.append(Cell(sampler, K, start=K - max(1, round(float(keep) * K))))
    labels = [c.label for c in cells]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ValueError(f"frontier grid lists cells twice: {dupes}")
    return cells


def parse_pair(pair: str) -> tuple[str, int]:
    sampler, _, K = str(pair).rpartition("-")
    if not sampler or not K.isdigit():
        raise ValueError(f"a (sampler, K) pair is written sampler-K, e.g. ddim-10; got {pair!r}")
    return sampler, int(K)


def select(cells: list[Cell], only) -> list[Cell]:
    if only is None:
        return cells
    by_label = {c.label: c for c in cells}
    unknown = [lab for lab in only if lab not in by_label]
    if unknown:
        raise ValueError(f"frontier.only names cells {unknown} that are not in the grid; known: {sorted(by_label)}")
    return [by_label[lab] for lab in only]
