"""The robomimic task suite (Lift, Can, Square) and three multi-object scenes (NutAssembly with both nuts, PickPlace
with four objects, two cubes to lift one of) as a gymnasium env, run directly on robosuite 1.5; optionally with
camera images and an instruction per episode.

robomimic 0.3 itself cannot be used with robosuite 1.5 (it imports ``mujoco_py``), so this module rebuilds what
matters from it: the task names, the Panda + OSC_POSE delta setup at 20 Hz, the horizon of 400 and the low-dim
observation keys ``object`` (robosuite's ``object-state``), ``robot0_eef_pos``, ``robot0_eef_quat`` (xyzw) and
``robot0_gripper_qpos``, and ``object`` split per object as ``object_<name>`` (``envs/objects.py``: the same object
has the same key in every task; ``two_cubes`` gathers its ``object`` from Stack's observables so that each cube has
Lift's 10 numbers). ``env_meta()`` returns robomimic's ``env_args`` dict, stored with every demo file.

Seeding: robosuite draws the object placement, the cube size (Lift) and the robot joint noise from ``env.rng`` and
from the ``rng`` of the placement sampler(s), which keep the generator they were built with. ``reset(seed=s)``
replaces all of them with ``np.random.default_rng(s)`` before the (hard) reset, so the same seed gives the same
episode, bit for bit.

Goals and language: in the multi-object scenes an episode's *goal* names one object (``envs.language.goals``: the
round or the square nut; milk, bread, cereal or can; the red or the green cube), drawn from the episode seed unless
``reset(options={"goal": ...})`` sets it, and success is *that* object on its peg or in its bin with the gripper
away from it (robosuite's per-object check), or for ``two_cubes`` *that* cube lifted ``LIFTED_DZ`` above where it
rested (robosuite's Stack scene, its stacking check unused); ``info["placed"]`` lists every goal placed and
``info["handled"]`` every goal whose object has been lifted 3 cm above its resting place this episode, so a policy
that goes for the wrong object shows.
With ``language=True`` the observation carries ``instruction`` (a string, one phrasing of the goal from
``instructions="train"`` or the held-out ``"heldout"`` paraphrases, drawn from the episode seed). With ``cameras``
it carries ``<camera>_image`` (H, W, 3) uint8, the right way up (robomimic's keys; shadows and reflections off).
The draws of goal and phrasing use their own generator, so Lift, Can and Square episodes are unchanged by them.
"""
from __future__ import annotations

import gc

import logging
import string
from typing import Any

import gymnasium as gym
import numpy as np

from envs import language as lang
from envs.objects import OBJECT_STATE, object_state, object_widths, split_objects

TASKS: dict[str, str] = {"lift": "Lift", "can": "PickPlaceCan", "square": "NutAssemblySquare",
                         "nut_assembly": "NutAssembly", "pick_place": "PickPlace", "two_cubes": "Stack"}
CAMERAS: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")  # robomimic's image tasks: front view and wrist
HANDLED_DZ = 0.03  # an object lifted this far above where it rested at reset was handled (picked up)
LIFTED_DZ = 0.04  # two_cubes' success: the named cube this far above where it rested (past HANDLED_DZ)
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
        cameras: tuple[str, ...] = (),
        image_size: int = 84,
        language: bool = False,
        instructions: str = "train",
    ):
        if task not in TASKS:
            raise ValueError(f"unknown robomimic task {task!r}; known tasks: {sorted(TASKS)}")
        cameras = tuple(cameras)
        unknown = [c for c in cameras if c not in CAMERAS]
        if unknown:
            raise ValueError(f"unknown camera(s) {unknown}; known: {list(CAMERAS)}")
        if image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if instructions not in lang.SPLITS:
            raise ValueError(f"instructions must be one of {lang.SPLITS}, got {instructions!r}")
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
        self.cameras, self.image_size = cameras, image_size
        self.language, self.instructions = language, instructions
        self.goals = lang.goals(task)
        self.goal, self.instruction = self.goals[0], None
        self._rest: dict[str, float] | None = None
        self._handled: set[str] = set()
        self._env_kwargs: dict[str, Any] = dict(
            robots="Panda",
            controller_configs=None,  # robosuite's default: BASIC composite with an OSC_POSE delta arm
            control_freq=20,
            horizon=horizon,
            ignore_done=True,
            reward_shaping=False,
            use_object_obs=True,
            use_camera_obs=bool(cameras),
            has_renderer=False,
            has_offscreen_renderer=render_mode == "rgb_array" or bool(cameras),
        )
        if cameras:
            self._env_kwargs.update(camera_names=list(cameras), camera_heights=image_size, camera_widths=image_size)
        self._env = robosuite.make(TASKS[task], **self._env_kwargs)
        spec = self._env.observation_spec()
        space = {k: gym.spaces.Box(-np.inf, np.inf, shape=np.shape(spec[_robosuite_key(k)]), dtype=np.float32)
                 for k in OBS_KEYS}
        if task in OBJECT_STATE:
            space["object"] = gym.spaces.Box(-np.inf, np.inf, shape=(sum(object_widths(task).values()),),
                                             dtype=np.float32)
        for key, width in object_widths(task).items():  # ``object`` split per object (envs/objects.py)
            space[key] = gym.spaces.Box(-np.inf, np.inf, shape=(width,), dtype=np.float32)
        for cam in cameras:
            space[f"{cam}_image"] = gym.spaces.Box(0, 255, shape=(image_size, image_size, 3), dtype=np.uint8)
        if self.language:
            space["instruction"] = gym.spaces.Text(max_length=256, charset=string.printable)
        self.observation_space = gym.spaces.Dict(space)
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
        # goal and phrasing from their own generator: the scene's draws stay those of the seed alone
        words = np.random.default_rng([episode_seed, 1])
        drawn = self.goals[int(words.integers(len(self.goals)))]
        goal = (options or {}).get("goal", drawn)
        if goal not in self.goals:
            raise ValueError(f"task {self.task!r} has no goal {goal!r}; its goals: {self.goals}")
        self.goal = goal
        self.instruction = lang.instruction(self.task, goal, self.instructions, words) if self.language else None
        old_ctx = self._render_context()
        raw = self._env.reset()
        self._release_render_context(old_ctx)
        self._rest = None  # set by the first success check: the objects' resting heights
        if self.cameras:  # the reset's images were rendered before the flags below could be set: render them again
            self._fast_rendering()  # (the images alone: the low-dim observation stays robosuite's reset one)
            raw = dict(raw)
            for cam in self.cameras:
                raw[f"{cam}_image"] = self._env.sim.render(camera_name=cam, width=self.image_size,
                                                           height=self.image_size)
        self._steps = 0
        return self._obs(raw), {**self._success_info(), "seed": episode_seed, "goal": goal}

    def step(self, action) -> tuple[dict[str, np.ndarray], float, bool, bool, dict]:
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape ({ACTION_DIM},), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"action must be finite, got {action.tolist()}")
        raw, reward, _, _ = self._env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        info = self._success_info()
        truncated = self._steps >= self.horizon
        return self._obs(raw), float(reward), info["is_success"], truncated, info

    def _success_info(self) -> dict:
        """``is_success``: the episode's goal is done (robosuite's check; in a multi-object scene, its per-object
        check for the named object). Multi-object scenes also give the ``goal``, ``placed`` (every goal whose
        object is in place) and ``handled`` (every goal whose object was lifted ``HANDLED_DZ`` above its resting
        height this episode; the first call after a reset records those heights)."""
        if len(self.goals) == 1:
            return {"is_success": bool(self._env._check_success())}
        heights = self._object_heights()
        if self._rest is None:  # the reset: where each object rests
            self._rest, self._handled = heights, set()
        if self.task == "two_cubes":  # lifted: LIFTED_DZ above where the cube rested
            flags = [heights[g] > self._rest[g] + LIFTED_DZ for g in self.goals]
        else:
            flags = self._env.objects_on_pegs if self.task == "nut_assembly" else self._env.objects_in_bins
        placed = [g for g, f in zip(self.goals, flags) if f]
        self._handled |= {g for g in self.goals if heights[g] > self._rest[g] + HANDLED_DZ}
        return {"is_success": self.goal in placed, "goal": self.goal, "placed": placed,
                "handled": [g for g in self.goals if g in self._handled]}

    def _object_heights(self) -> dict[str, float]:
        """Height of each goal's object (its body origin)."""
        rs = self._env
        if self.task == "nut_assembly":
            names = {g: rs.nuts[rs.nut_to_id[g]].name for g in self.goals}
        elif self.task == "two_cubes":
            return {g: float(rs.sim.data.body_xpos[b][2]) for g, b in zip(self.goals, self.cube_bodies())}
        else:
            names = {g: g.capitalize() for g in self.goals}
        return {g: float(rs.sim.data.body_xpos[rs.obj_body_id[n]][2]) for g, n in names.items()}

    def cube_bodies(self) -> tuple[int, int]:
        """two_cubes: the body ids of the red and the green cube (Stack's cubeA, cubeB), the goals' order."""
        return self._env.cubeA_body_id, self._env.cubeB_body_id

    def hold_action(self, last: np.ndarray | None = None) -> np.ndarray:
        """What a late policy leaves the arm doing: no motion (a zero OSC delta), the gripper as last commanded."""
        action = np.zeros(ACTION_DIM, dtype=np.float32)
        action[6] = -1.0 if last is None else float(np.asarray(last)[6])
        return action

    def render(self) -> np.ndarray | None:
        """(H, W, 3) uint8 frame from ``camera``, the right way up; None unless ``render_mode == "rgb_array"``."""
        if self.render_mode != "rgb_array":
            return None
        self._fast_rendering()
        frame = self._env.sim.render(width=self.render_size, height=self.render_size, camera_name=self.camera)
        return np.ascontiguousarray(frame[::-1])  # robosuite renders in OpenGL convention (bottom row first)

    def _render_context(self):
        sim = getattr(self._env, "sim", None)
        return getattr(sim, "_render_context_offscreen", None)

    def _release_render_context(self, old) -> None:
        """Free the render context a hard reset replaced, while its own GL context is current.

        robosuite's hard reset rebuilds the sim and its render context; the old one sits in a reference cycle that
        holds native buffers (about 120 MB per reset with two cameras: a 50-episode camera rollout grew past 14 GB
        and was killed). Left to the garbage collector, it is freed whenever a collection runs, with the *new*
        context current: its ``mjr_freeContext`` then deletes the new context's framebuffer and textures (they have
        the same ids) and every later frame is noise. So free it here with its own context current, collect the
        cycle (freeing twice is a no-op), and make the new context current again."""
        new = self._render_context()
        if old is not None and old is not new:
            old.gl_ctx.make_current()
            old.con.free()
            old.gl_ctx.free()
        gc.collect()
        if new is not None:
            new.gl_ctx.make_current()

    def _fast_rendering(self) -> None:
        """Shadows and reflections off (they cost about 2x on a CPU renderer); the context is rebuilt by every hard
        reset, so call after it."""
        import mujoco

        ctx = self._env.sim._render_context_offscreen
        if ctx is not None:
            ctx.scn.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            ctx.scn.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0

    def close(self) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.close()
            self._env = None

    # ------------------------------------------------------------------ robomimic extras
    def env_meta(self) -> dict:
        """robomimic's ``env_args``: enough to rebuild the scene with ``robosuite.make(env_name, **env_kwargs)``;
        ``wrapper``: this class's arguments beyond robosuite's (the task, cameras, language)."""
        wrapper = {"task": self.task, "horizon": self.horizon, "cameras": list(self.cameras),
                   "image_size": self.image_size, "language": self.language, "instructions": self.instructions}
        return {"env_name": TASKS[self.task], "type": 1, "env_kwargs": dict(self._env_kwargs), "wrapper": wrapper}

    def _obs(self, raw: dict) -> dict:
        obs = {k: np.asarray(raw[_robosuite_key(k)], dtype=np.float32).copy() for k in OBS_KEYS if k != "object"}
        obs["object"] = np.asarray(object_state(self.task, raw), dtype=np.float32).copy()
        obs.update({k: v.copy() for k, v in split_objects(self.task, obs["object"]).items()})
        for cam in self.cameras:  # robosuite renders in OpenGL convention (bottom row first)
            obs[f"{cam}_image"] = np.ascontiguousarray(raw[f"{cam}_image"][::-1])
        if self.language:
            obs["instruction"] = self.instruction
        return obs

