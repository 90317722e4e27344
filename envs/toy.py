"""A 2-D point-reaching task with a wall: fast, pure numpy, and multimodal by construction.

The agent starts below a wall and must reach a goal above it; it slides along the wall when it pushes
into it. The scripted expert goes around
the wall on the left or on the right at random, so the demonstrations hold two modes; a policy that
averages them drives straight into the wall and gets stuck. That makes the task a cheap check that a
diffusion policy really models a multimodal action distribution. One episode costs well under 1 ms.

With ``language=True`` (the toy of the language-conditioned tasks, for tests of the VLA pipeline) there are two
goals, a red and a blue one, on either side above the wall, drawn per episode; the instruction names one
(``envs.language``, task ``toy``) and only reaching *that* one succeeds. The observation then holds
``agentview_image`` (``image_size`` px, top-down) and ``instruction``; ``goal_pos`` is the named goal's (for the
expert; a policy that should read the instruction and the image must not be given it).
"""
from __future__ import annotations

import string

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs import language as lang

WALL_HALF_WIDTH, WALL_HALF_HEIGHT = 0.3, 0.1  # a box centred at the origin
GOAL_TOLERANCE = 0.1
MAX_SPEED = 0.08  # position change per step at |action| = 1
COLOURS = {"red": (220, 40, 40), "blue": (40, 60, 220)}  # the language toy's two goals


def _in_wall(p: np.ndarray) -> bool:
    return abs(p[0]) < WALL_HALF_WIDTH and abs(p[1]) < WALL_HALF_HEIGHT


class ToyReachEnv(gym.Env):
    """Observation keys: ``agent_pos`` (2,) and ``goal_pos`` (2,); action: velocity in [-1, 1]^2."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: str = "toy", horizon: int = 60, render_mode: str | None = None, render_size: int = 96,
                 language: bool = False, image_size: int = 24, instructions: str = "train",
                 cameras: tuple[str, ...] = ()):
        if task != "toy":
            raise ValueError(f"the toy env has one task, 'toy'; got {task!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.task = "toy"
        self.horizon = self.max_episode_steps = int(horizon)
        self.render_mode = render_mode
        self.render_size = int(render_size)
        if tuple(cameras) not in ((), ("agentview",)) or (cameras and not language):
            raise ValueError(f"the toy env has one camera, agentview, with language=True; got cameras={cameras}")
        if instructions not in lang.SPLITS:
            raise ValueError(f"instructions must be one of {lang.SPLITS}, got {instructions!r}")
        self.language, self.image_size, self.instructions = bool(language), int(image_size), instructions
        self.goals = lang.goals("toy") if self.language else ("goal",)
        self.goal, self.instruction, self._goals = self.goals[0], None, {}
        box = spaces.Box(-1.0, 1.0, (2,), np.float32)
        space = {"agent_pos": box, "goal_pos": box}
        if self.language:
            space["agentview_image"] = spaces.Box(0, 255, (self.image_size, self.image_size, 3), np.uint8)
            space["instruction"] = spaces.Text(max_length=256, charset=string.printable)
        self.observation_space = spaces.Dict(space)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self._agent = np.zeros(2)
        self._goal = np.zeros(2)
        self._t = 0

    def env_meta(self) -> dict:
        meta = {"env_name": "ToyReach", "type": 0, "env_kwargs": {"horizon": self.horizon}}
        if self.language:
            meta["wrapper"] = {"task": "toy", "language": True, "image_size": self.image_size,
                               "instructions": self.instructions, "cameras": ["agentview"]}
        return meta

    def _obs(self) -> dict:
        obs = {"agent_pos": self._agent.astype(np.float32), "goal_pos": self._goal.astype(np.float32)}
        if self.language:
            obs["agentview_image"] = self._draw(self.image_size)
            obs["instruction"] = self.instruction
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self._agent = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.75, -0.55)])
        self._goal = np.array([rng.uniform(-0.1, 0.1), rng.uniform(0.55, 0.7)])
        self._t = 0
        if not self.language:
            return self._obs(), {"is_success": False}
        left = rng.permutation(self.goals)  # which colour sits on the left
        self._goals = {g: np.array([(-0.5 if i == 0 else 0.5) + rng.uniform(-0.1, 0.1), rng.uniform(0.5, 0.7)])
                       for i, g in enumerate(left)}
        self.goal = (options or {}).get("goal", self.goals[int(rng.integers(len(self.goals)))])
        if self.goal not in self.goals:
            raise ValueError(f"task 'toy' has no goal {self.goal!r}; its goals: {self.goals}")
        self._goal = self._goals[self.goal]
        self.instruction = lang.instruction("toy", self.goal, self.instructions, rng)
        return self._obs(), {"is_success": False, "placed": [], "goal": self.goal}

    def step(self, action):
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (2,):
            raise ValueError(f"ToyReachEnv action must have shape (2,), got {action.shape}")
        if not np.all(np.isfinite(action)):
            raise ValueError(f"ToyReachEnv action is not finite: {action}")
        delta = MAX_SPEED * np.clip(action, -1.0, 1.0)
        for axis in (0, 1):  # move axis by axis; a move into the wall is refused, so the agent slides along it
            pos = self._agent.copy()
            pos[axis] = np.clip(pos[axis] + delta[axis], -1.0, 1.0)
            if not _in_wall(pos):
                self._agent = pos
        self._t += 1
        success = bool(np.linalg.norm(self._agent - self._goal) < GOAL_TOLERANCE)
        truncated = self._t >= self.horizon
        info = {"is_success": success}
        if self.language:
            info["goal"] = self.goal
            info["placed"] = [g for g, p in self._goals.items() if np.linalg.norm(self._agent - p) < GOAL_TOLERANCE]
        return self._obs(), float(success), success, truncated, info

    def hold_action(self, last: np.ndarray | None = None) -> np.ndarray:
        """Zero velocity: the agent stays where it is."""
        return np.zeros(2, dtype=np.float32)

    def render(self) -> np.ndarray:
        """A top-down (H, W, 3) uint8 frame: wall grey, goal green, agent red (language: goals red and blue,
        agent black)."""
        return self._draw(self.render_size)

    def _draw(self, n: int) -> np.ndarray:
        ys, xs = np.mgrid[0:n, 0:n]
        x = xs / (n - 1) * 2 - 1
        y = 1 - ys / (n - 1) * 2
        img = np.full((n, n, 3), 255, np.uint8)
        img[(np.abs(x) < WALL_HALF_WIDTH) & (np.abs(y) < WALL_HALF_HEIGHT)] = (150, 150, 150)
        if self.language:
            for g, p in self._goals.items():
                img[(x - p[0]) ** 2 + (y - p[1]) ** 2 < GOAL_TOLERANCE**2] = COLOURS[g]
            agent = (0, 0, 0)
        else:
            img[(x - self._goal[0]) ** 2 + (y - self._goal[1]) ** 2 < GOAL_TOLERANCE**2] = (40, 170, 60)
            agent = (220, 40, 40)
        img[(x - self._agent[0]) ** 2 + (y - self._agent[1]) ** 2 < max(0.04, 2.5 / n) ** 2] = agent
        return img


class ToyExpert:
    """Goes to a waypoint beside the wall (left or right, drawn per episode), then to the goal."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.side = 1.0
        self.reached_waypoint = False

    def reseed(self, seed: int) -> None:
        """Draw the next episode's side from ``seed`` (eval/collect.py: an episode is a function of its seed)."""
        self.rng = np.random.default_rng([seed, 13])

    def reset(self) -> None:
        self.side = float(self.rng.choice([-1.0, 1.0]))
        self.reached_waypoint = False

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        agent, goal = obs["agent_pos"].astype(np.float64), obs["goal_pos"].astype(np.float64)
        waypoint = np.array([0.5 * self.side, WALL_HALF_HEIGHT + 0.05])
        if agent[1] > WALL_HALF_HEIGHT:  # above the wall: the goal is in plain reach
            self.reached_waypoint = True
        target = goal if self.reached_waypoint else waypoint
        return np.clip((target - agent) / MAX_SPEED, -1.0, 1.0).astype(np.float32)
