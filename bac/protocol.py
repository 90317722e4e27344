"""What a cache method may ask of a model: one small protocol, implemented in the model's own room.

DP-T implements it in ``policies/``, the DiT backends in ``backends/``, a VLA in its own folder; the cache
methods (``bac.methods``) are built from it and know nothing else about the model:

  cache_model()            the denoiser the engine attaches to (its blocks: its ``cache_blocks`` or the defaults)
  cache_signature()        what a schedule is made for: sampler, K, weights hash (``Signature``)
  cache_call()             one denoiser call as sampling makes it (FLOPs profiling; it also shows the block order)
  cache_sample(cursor, n, seed)   one sampling run over ``n`` calibration inputs, announcing every step to
                           ``cursor`` (a cache engine recording the blocks, a schedule, or None); the same seed
                           gives the same run; returns the final output (a tensor; output-weighted schedules,
                           ``bac.sensitivity``, need it)
  cache_calibration()      optional: calibration summaries saved for this signature (absent or returning None:
                           bac computes them from ``cache_sample`` over 8 inputs)
  cache_step_weights()     optional: output-sensitivity step weights saved for this signature (``bac.sensitivity``)
  cache_blocks             optional attribute: a block declaration for ``bac.engine.attach`` (None: the model's)

Shapes: K denoising steps, N calibration inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from bac.blocks import BlockInfo
from bac.sampling import StepCursor


@dataclass(frozen=True)
class Signature:
    """What a schedule is made for: the sampler (its class name), the step count K, the denoiser's weights."""

    scheduler: str
    num_steps: int
    model_hash: str

    def meta(self) -> dict:
        """The fields a ``bac.schedule.Schedule`` records (besides K)."""
        return {"scheduler": self.scheduler, "model_hash": self.model_hash}

    def check(self, schedule) -> None:
        """Raise ``ScheduleMismatch`` naming the field if ``schedule`` was made for something else."""
        schedule.check_compatible(num_steps=self.num_steps, scheduler=self.scheduler, model_hash=self.model_hash)


@runtime_checkable
class CacheTarget(Protocol):
    """A model as cache methods see it (see the module docstring)."""

    def cache_model(self) -> nn.Module: ...

    def cache_signature(self) -> Signature: ...

    def cache_call(self) -> Callable[[], object]: ...

    def cache_sample(self, cursor: StepCursor | None, n: int, seed: int) -> torch.Tensor | None: ...


class Trajectory(NamedTuple):
    """One recorded uncached run: the blocks (as they run), features {name: (K, N, ...)}, first block input."""

    blocks: list[BlockInfo]
    features: dict[str, np.ndarray]
    first_input: np.ndarray


def attach_to(target: CacheTarget, schedule=None, profile: bool = False, **kw):
    """``bac.engine.attach`` on the target's denoiser with its block declaration; with ``profile``, one
    ``cache_call`` counts its FLOPs (``engine.flops_ratio()``) and shows the block order."""
    from bac.engine import attach

    engine = attach(target.cache_model(), schedule, blocks=getattr(target, "cache_blocks", None), **kw)
    if profile:
        engine.profile_flops(target.cache_call())
    return engine


def blocks_of(target: CacheTarget) -> list[BlockInfo]:
    """The target's blocks in the order they run, with their depth (one traced denoiser call)."""
    engine = attach_to(target)
    try:
        return engine.trace(target.cache_call())
    finally:
        engine.detach()


_TRAJECTORY: dict = {}  # the last recorded trajectory: the fitted methods of one model share it


def record(target: CacheTarget, n: int, seed: int = 0) -> Trajectory:
    """One uncached run of ``target.cache_sample`` with every block's value and the first block's input recorded,
    as float32 numpy; the last one is kept in memory (per denoiser, signature, n and seed)."""
    model = target.cache_model()
    key = (id(model), target.cache_signature(), n, seed)
    if key not in _TRAJECTORY:
        from bac.engine import FIRST_INPUT

        engine = attach_to(target)  # no schedule: every block computes, and recording keeps each value
        try:
            with engine.recording(first_input=True) as rec:
                target.cache_sample(engine, n, seed)
        finally:
            engine.detach()
        first = torch.stack(rec.pop(FIRST_INPUT)).numpy()
        _TRAJECTORY.clear()
        _TRAJECTORY[key] = Trajectory(engine.blocks, {name: torch.stack(v).numpy() for name, v in rec.items()}, first)
    return _TRAJECTORY[key]
