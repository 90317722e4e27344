"""A simulated robot behind the wall-clock loop's ``Robot`` interface (``bac.wallclock.Robot``).

On hardware the world moves whether or not the policy has answered; here the simulator advances one control
period per ``send_action``, and the wall-clock loop sends an action (the queued one or the hold action) at every
tick of its own clock, so the simulated world keeps the control rate while the policy computes.
"""
from __future__ import annotations

import numpy as np


class SimRobot:
    """A gymnasium env as a robot: ``get_observation``, ``send_action``, ``hold_action``, ``stop``, ``control_hz``."""

    def __init__(self, env, seed: int, control_hz: float | None = None):
        self.env = env
        self.seed = int(seed)
        self.control_hz = float(control_hz or env.metadata.get("render_fps", 20))
        self._obs, _ = env.reset(seed=self.seed)
        self.steps = 0
        self.success = False
        self.done = False
        self.stopped = False
        self.last_action: np.ndarray | None = None

    def get_observation(self) -> dict[str, np.ndarray]:
        return {k: np.array(v, copy=True) for k, v in self._obs.items()}

    def send_action(self, action: np.ndarray) -> None:
        if self.stopped:
            raise RuntimeError("send_action after stop(): the robot is stopped")
        self.last_action = np.asarray(action, dtype=np.float32)
        self._obs, _, terminated, truncated, info = self.env.step(self.last_action)
        self.steps += 1
        self.success = self.success or bool(info.get("is_success", False))
        self.done = self.success or bool(terminated) or bool(truncated)

    def hold_action(self, last: np.ndarray | None = None) -> np.ndarray:
        fn = getattr(self.env, "hold_action", None)
        if fn is None:
            raise AttributeError(f"{type(self.env).__name__} declares no hold_action; the loop cannot hold it safely")
        return fn(last)

    def safe_action(self) -> np.ndarray:
        """The action to stop with, declared once: the env's hold from rest (no motion, gripper open)."""
        return self.hold_action(None)

    def stop(self) -> None:
        """Safe stop: one hold action (stand still, gripper kept), then refuse further actions."""
        if not self.stopped:
            try:
                self.env.step(self.hold_action(self.last_action))
            finally:
                self.stopped = True
