"""What a method's builder gets: the model as a ``bac.protocol.CacheTarget``, and what is derived from it, once."""
from __future__ import annotations

from functools import cached_property

import numpy as np

from bac.blocks import BlockInfo
from bac.protocol import CacheTarget, Signature, Trajectory, blocks_of, record


class CacheContext:
    def __init__(self, target: CacheTarget, calibration_inputs: int = 8):
        if not isinstance(target, CacheTarget):
            raise TypeError(f"{type(target).__name__} does not implement bac.protocol.CacheTarget "
                            "(cache_model, cache_signature, cache_call, cache_sample)")
        self.target = target
        self.calibration_inputs = calibration_inputs

    @cached_property
    def signature(self) -> Signature:
        return self.target.cache_signature()

    @property
    def K(self) -> int:
        return self.signature.num_steps

    @property
    def meta(self) -> dict:
        """What every schedule a builder makes records about its model and sampler."""
        return self.signature.meta()

    @cached_property
    def blocks(self) -> list[BlockInfo]:
        """The blocks in the order they run, with their depth."""
        return blocks_of(self.target)

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.blocks]

    def calibration(self):
        """The target's saved calibration (``cache_calibration``), else one made now from its uncached run."""
        if "_calibration" not in self.__dict__:
            saved = getattr(self.target, "cache_calibration", None)
            self._calibration = saved() if saved is not None else None
            if self._calibration is None:  # no such method, or none saved for this signature
                from bac.calibration import calibrate

                self._calibration = calibrate(self.target, self.calibration_inputs)
        return self._calibration

    def step_weights(self) -> np.ndarray:
        """Output-sensitivity step weights (``bac.sensitivity``): the target's saved ones
        (``cache_step_weights``, optional), else measured now over ``calibration_inputs`` inputs (at most 4)."""
        if "_step_weights" not in self.__dict__:
            saved = getattr(self.target, "cache_step_weights", None)
            if saved is not None:
                self._step_weights = saved()
            else:
                from bac.sensitivity import measure_step_weights

                self._step_weights = measure_step_weights(self.target, self.calibration(),
                                                          min(4, self.calibration_inputs))
        return self._step_weights

    def trajectory(self, n: int, seed: int = 0) -> Trajectory:
        """One recorded uncached run over ``n`` calibration inputs (kept in memory for the next fit)."""
        traj = record(self.target, n, seed)
        if [b.name for b in traj.blocks] != self.names:
            raise RuntimeError("recorded blocks differ from the model's blocks")
        return traj
