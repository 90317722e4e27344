"""The robomimic task suite (Lift, Can, Square) as a gymnasium env, run directly on robosuite 1.5.

robomimic 0.3 itself cannot be used with robosuite 1.5 (it imports ``mujoco_py``), so this module rebuilds what
matters from it: the task names, the Panda + OSC_POSE delta setup at 20 Hz, the horizon of 400 and the low-dim
observation keys ``object`` (robosuite's ``object-state``), ``robot0_eef_pos``, ``robot0_eef_quat`` (xyzw) and
``robot0_gripper_qpos``. ``env_meta()`` returns robomimic's ``env_args`` dict, stored with every demo file.

Seeding: robosuite draws the object placement, the cube size (Lift) and the robot joint noise from ``env.rng`` and
from the ``rng`` of the placement sampler(s), which keep the generator they were built with. ``reset(seed=s)``
replaces all of them with ``np.random.default_rng(s)`` before the (hard) reset, so the same seed gives the same
episode, bit for bit.
"""
from __future__ import annotations

import logging
from typing import Any

import gymnasium as gym
import numpy as np

TASKS: dict[str, str] = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare"}
OBS_KEYS: tuple[str, ...] = ("object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")
ACTION_DIM = 7  # OSC_POSE delta: dx, dy, dz, dax, day, daz (axis-angle), gripper (-1 open, +1 close)


def _robosuite_key(key: str) -> str:
    return "object-state" if key == "object" else key


def _seed_samplers(sampler: Any, rng: np.random.Generator) -> None:
    """Give a placement sampler, and every sub-sampler of a composite one, the generator ``rng``."""
    if sampler is None:
        return
    if hasattr(sampler, "rng"):
        sampler.rng = rng
    for sub in getattr(sampler, "samplers", {}).values():
        _seed_samplers(sub, rng)


class RobomimicEnv(gym.Env):
    """One robomimic task on robosuite: dict obs of float32 arrays, actions in [-1, 1]^7.

    ``step`` returns ``terminated = info["is_success"]`` (robosuite's ``_check_success()``) and ``truncated`` once
    ``horizon`` steps have been taken; the caller decides whether to stop at success.
    """

    metadata = {"render_fps": 20, "render_modes": ["rgb_array"]}

    def __init__(
        self,
        task: str = "lift",
        horizon: int = 400,
        render_mode: str | None = None,
        render_size: int = 256,
        camera: str = "agentview",
    ):
        if task not in TASKS:
            raise ValueError(f"unknown robomimic task {task!r}; known tasks: {sorted(TASKS)}")
        if horizon <= 0:
            raise ValueError(f"horizon must be positive, got {horizon}")
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or one of {self.metadata['render_modes']}, got {render_mode!r}")
        import robosuite  # lazy: seconds to import, and only this module needs it

        # robosuite logs "Loading controller configuration" at INFO on every (hard) reset; keep warnings only.
        logging.getLogger("robosuite_logs").setLevel(logging.WARNING)

        self.task = task
        self.horizon = horizon
        self.max_episode_steps = horizon
        self.render_mode = render_mode
        self.render_size = render_size
        self.camera = camera
        self._env_kwargs: dict[str, Any] = dict(
            robots="Panda",
            controller_configs=None,  # robosuite's default: BASIC composite with an OSC_POSE delta arm
            control_freq=20,
            horizon=horizon,
            ignore_done=True,
            reward_shaping=False,
            use_object_obs=True,
            use_camera_obs=False,
            has_renderer=False,
            has_offscreen_renderer=render_mode == "rgb_array",
        )
        self._env = robosuite.make(TASKS[task], **self._env_kwargs)
        spec = self._env.observation_spec()
        self.observation_space = gym.spaces.Dict(
            {
                k: gym.spaces.Box(-np.inf, np.inf, shape=np.shape(spec[_robosuite_key(k)]), dtype=np.float32)
                for k in OBS_KEYS
            }
        )
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._steps = 0

    # ------------------------------------------------------------------ gym API
    @property
    def sim_env(self):
        """The underlying robosuite env (privileged state for scripted experts and diagnostics)."""
        return self._env

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, np.ndarray], dict]:
        super().reset(seed=seed)
        # Without a seed, draw the episode's seed from np_random so a seeded sequence of resets is reproducible too.
        episode_seed = seed if seed is not None else int(self.np_random.integers(2**63 - 1))
        rng = np.random.default_rng(episode_seed)
        self._env.rng = rng
        _seed_samplers(getattr(self._env, "placement_initializer", None), rng)
        raw = self._env.reset()
        self._steps = 0
        return self._obs(raw), {"is_success": bool(self._env._check_success()), "seed": episode_seed}

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        raw, reward, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        success = bool(self._env._check_success())
        truncated = self._steps >= self.horizon
        return self._obs(raw), float(reward), success, truncated, {"is_success": success}

    def hold_action(self, last: np.ndarray | None = None) -> np.ndarray:
        """What a late policy leaves the arm doing: no motion (a zero OSC delta), the gripper as last commanded."""
        action = np.zeros(ACTION_DIM, dtype=np.float32)
        action[6] = -1.0 if last is None else float(np.asarray(last)[6])
        return action

    def render(self) -> np.ndarray | None:
        """(H, W, 3) uint8 frame from ``camera``, the right way up; None unless ``render_mode == "rgb_array"``."""
        if self.render_mode != "rgb_array":
            return None
        import mujoco

        ctx = self._env.sim._render_context_offscreen
        if ctx is not None:  # shadows and reflections cost about 2x on a CPU renderer
            ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
        frame = self._env.sim.render(width=self.render_size, height=self.render_size, camera_name=self.camera)
        return np.ascontiguousarray(frame[::-1])  # robosuite renders in OpenGL convention (bottom row first)

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None

    # ------------------------------------------------------------------ robomimic extras
    def env_meta(self) -> dict:
        """robomimic's ``env_args``: enough to rebuild this env with ``robosuite.make(env_name, **env_kwargs)``."""
        return {"env_name": TASKS[self.task], "type": 1, "env_kwargs": dict(self._env_kwargs)}

    def _obs(self, raw: dict) -> dict[str, np.ndarray]:
        return {k: np.asarray(raw[_robosuite_key(k)], dtype=np.float32).copy() for k in OBS_KEYS}

