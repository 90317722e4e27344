"""The schedule artifact (which block computes at which denoising step) and the builders of the ablation rows.

A ``Schedule`` is what calibration writes and the cache engine reads: per block the sorted steps at which it
computes (and stores) its feature; at every other step it reuses. ``to_mask()`` gives the engine its host-side
boolean table (n_blocks, K). The schedule also records what it was made for (K, scheduler, model hash, ...), and
``check_compatible`` refuses to run it on anything else, because a DDPM-100 schedule means nothing for DDIM-10.

Rows of the paper's ablation (Ji et al., ICLR 2026), one builder each:
  none          every block, every step (the exactness reference)
  uniform       all blocks at 0, i, 2i, ... with i = max(1, K // S)
  unified_acs   one ACS schedule for all blocks, plus K-1
  blockwise_acs ACS per block, plus K-1
  bac           ACS per block, then the Bubbling Union (which adds K-1)
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from bac.acs import METRICS, acs_steps, similarity_matrix
from bac.blocks import BlockInfo
from bac.bubbling import block_errors, bubbling_union, top_error_blocks

METHODS = ("none", "uniform", "unified_acs", "blockwise_acs", "bac")
# masks that bac.profiling builds for the literature's static methods (and the forecasters' masks)
OTHER_MASKS = ("fora", "delta_dit", "profiling", "ertacache", "taylorseer", "foca", "abcache", "hyca")


class ScheduleMismatch(ValueError):
    """A schedule is used with another model, block list, K or scheduler than it was made for."""


def _package_version() -> str:
    import bac  # lazily: bac/__init__ may one day import this module

    return bac.__version__


@dataclass
class Schedule:
    blocks: list[str]  # row b of to_mask() is blocks[b] (calibration order = the engine's)
    steps: dict[str, list[int]]  # block -> sorted steps in [0, K) at which it computes; always holds 0
    num_steps: int  # K
    method: str  # one of METHODS
    scheduler: str = ""  # e.g. "DDPMScheduler"
    model_hash: str = ""
    metric: str | None = None  # ACS metric (METRICS); None for none/uniform
    n_updates: int | None = None  # S
    n_bubble: int | None = None  # n of the Bubbling Union; bac only
    calibration: dict = field(default_factory=dict)  # free-form: source file, n observations, seed, ...
    version: str = field(default_factory=_package_version)  # bac.__version__ that made it

    def __post_init__(self):
        if self.method not in METHODS + OTHER_MASKS:
            raise ValueError(f"unknown method {self.method!r}; known: {list(METHODS + OTHER_MASKS)}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {self.num_steps!r}")
        if self.metric is not None and self.metric not in METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; known: {list(METRICS)}")
        self.blocks = list(self.blocks)
        if not self.blocks or len(set(self.blocks)) != len(self.blocks):
            raise ValueError(f"blocks must be a non-empty list of distinct names, got {self.blocks}")
        missing = [b for b in self.blocks if b not in self.steps]
        extra = [b for b in self.steps if b not in self.blocks]
        if missing or extra:
            raise ValueError(f"steps must have exactly the blocks; missing {missing}, extra {extra}")
        self.steps = {b: sorted({int(k) for k in self.steps[b]}) for b in self.blocks}
        self._check_steps()

    def _check_steps(self) -> None:
        for b, s in self.steps.items():
            bad = [k for k in s if not 0 <= k < self.num_steps]
            if bad:
                raise ValueError(f"steps {bad} of block {b!r} are outside [0, num_steps={self.num_steps})")
            if 0 not in s:
                raise ValueError(f"block {b!r} never computes step 0, so it has nothing to reuse before its first step")

    def to_mask(self) -> np.ndarray:
        """(n_blocks, K) bool; mask[b, k] True = block ``blocks[b]`` computes (and stores) at step k."""
        self._check_steps()
        mask = np.zeros((len(self.blocks), self.num_steps), dtype=bool)
        for row, b in enumerate(self.blocks):
            mask[row, self.steps[b]] = True
        return mask

    def computed_fraction(self) -> float:
        """Fraction of (block, step) pairs that compute; 1.0 for ``none``."""
        return float(self.to_mask().mean())

    def check_compatible(self, *, blocks=None, num_steps=None, scheduler=None, model_hash=None) -> None:
        """Raise ``ScheduleMismatch`` naming the first field that differs from what the caller runs.

        ``blocks`` (names or BlockInfo) must be the same set of names; order may differ, since a block is its
        name (``to_mask`` rows follow ``self.blocks``; map them by name). Arguments left as None are not checked.
        """
        if blocks is not None:
            names = [b.name if isinstance(b, BlockInfo) else b for b in blocks]
            missing = [b for b in names if b not in self.steps]
            extra = [b for b in self.blocks if b not in names]
            if missing or extra:
                raise ScheduleMismatch(
                    f"schedule blocks differ from the model's: the schedule lacks {missing} and has extra {extra}")
        for name, want in (("num_steps", num_steps), ("scheduler", scheduler), ("model_hash", model_hash)):
            have = getattr(self, name)
            if want is not None and want != have:
                raise ScheduleMismatch(f"schedule was made for {name}={have!r}, this run has {name}={want!r}")

    def save(self, path: str | Path) -> None:
        """Write pretty JSON; each step list stays on one line."""
        text = json.dumps(asdict(self), indent=2)
        text = re.sub(r"\[[\d,\s]*\]", lambda m: json.dumps(json.loads(m.group(0))), text)  # ints on one line
        Path(path).write_text(text + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Schedule":
        data = json.loads(Path(path).read_text())
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a schedule file holds a JSON object, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        unknown = [n for n in data if n not in names]
        if missing or unknown:
            raise ValueError(f"{path}: malformed schedule file; missing fields {missing}, unknown fields {unknown}")
        return cls(**data)


def _names(blocks) -> list[str]:
    return [b.name if isinstance(b, BlockInfo) else b for b in blocks]


def compute_all(blocks, K: int, **meta) -> Schedule:
    """Method "none": every block computes every step. ``blocks`` are names or BlockInfo; ``meta`` goes to
    Schedule (scheduler, model_hash, calibration, version)."""
    names = _names(blocks)
    return Schedule(names, {b: list(range(K)) for b in names}, K, "none", **meta)


def uniform(blocks, K: int, n_updates: int, **meta) -> Schedule:
    """The paper's Uniform row: all blocks compute at 0, i, 2i, ... < K with i = max(1, K // S).

    No forced last step. K // S rounds down, so a budget S that does not divide K gives more than S updates
    (K=100, S=8: i=12, 9 updates), as in the authors' threshold mode.
    """
    if n_updates < 1:
        raise ValueError(f"n_updates must be >= 1, got {n_updates}")
    names = _names(blocks)
    steps = list(range(0, K, max(1, K // n_updates)))
    return Schedule(names, {b: steps for b in names}, K, "uniform", n_updates=n_updates, **meta)


def from_calibration(
    features: dict[str, np.ndarray],
    blocks: list[BlockInfo],
    method: str,
    n_updates: int,
    n_bubble: int = 0,
    metric: str = "cosine",
    **meta,
) -> Schedule:
    """Build any ablation row from calibration features: block name -> (K, D) or (K, N, D), one flattened
    feature (the branch's residual delta) per denoising step, for N calibration samples.
    See :func:`from_similarity` for the methods."""
    names = [b.name for b in blocks]
    missing = [n for n in names if n not in features]
    if missing:
        raise ValueError(f"no calibration features for blocks {missing}")
    lengths = {n: len(features[n]) for n in names}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"blocks have features for different numbers of steps: {lengths}")
    sims = {n: similarity_matrix(features[n], metric) for n in names}  # each (K, K)
    errors = block_errors({n: features[n] for n in names}) if method == "bac" else {}
    return from_similarity(sims, errors, blocks, method, n_updates, n_bubble, metric, **meta)


def from_similarity(
    sims: dict[str, np.ndarray],
    errors: dict[str, float],
    blocks: list[BlockInfo],
    method: str,
    n_updates: int,
    n_bubble: int = 0,
    metric: str = "cosine",
    **meta,
) -> Schedule:
    """Build any ablation row from per-block (K, K) similarity matrices of ``metric`` and, for bac, the
    Bubbling Union's per-block errors (mean pairwise L1 of the features across steps).

    unified_acs: one ACS schedule on the mean of all blocks' similarity matrices, given to every block, plus
      K-1. The authors' ablation used the schedule of layer 0's self-attention instead; the mean is our choice
      because it depends on no particular block or architecture (a model without an "attn" block in layer 0
      has no such schedule) and weighs every block's drift. With a distance metric the mean weighs blocks by
      scale. K-1 is added as for the per-block rows, so that unified and block-wise ACS differ only in being
      per block.
    blockwise_acs: ACS per block, plus K-1 for every block.
    bac: ACS per block, then the Bubbling Union with ``n_bubble`` (adds K-1); the chosen blocks and their
      errors are recorded in ``calibration["bubble_blocks"]``.
    none, uniform: as ``compute_all`` / ``uniform`` with K taken from the matrices.
    ``n_bubble`` is ignored by every method but bac (so one config can sweep the rows).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; known: {list(METRICS)}")
    names = [b.name for b in blocks]
    missing = [n for n in names if n not in sims]
    if missing:
        raise ValueError(f"no calibration features for blocks {missing}")
    K = len(sims[names[0]])

    if method == "none":
        return compute_all(names, K, **meta)
    if method == "uniform":
        return uniform(names, K, n_updates, **meta)

    maximize = METRICS[metric]
    calibration = dict(meta.pop("calibration", {}))
    if method == "unified_acs":
        shared = acs_steps(np.mean([sims[n] for n in names], axis=0), n_updates, maximize)
        steps = {n: sorted(set(shared) | {K - 1}) for n in names}
    else:
        steps = {n: acs_steps(sims[n], n_updates, maximize) for n in names}
        if method == "blockwise_acs":
            steps = {n: sorted(set(s) | {K - 1}) for n, s in steps.items()}
    if method != "bac":
        return Schedule(names, steps, K, method, metric=metric, n_updates=n_updates, calibration=calibration, **meta)

    calibration["bubble_blocks"] = {u: errors[u] for u in top_error_blocks(blocks, errors, n_bubble)}
    steps = bubbling_union(steps, blocks, errors, n_bubble, K)
    return Schedule(names, steps, K, "bac", metric=metric, n_updates=n_updates, n_bubble=n_bubble,
                    calibration=calibration, **meta)
