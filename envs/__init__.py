"""Gymnasium environments: the robomimic task suite on robosuite 1.5 and a tiny toy task for tests.

Every env returns dict observations of float32 arrays (one key per low-dim modality), takes actions in
[-1, 1], sets ``info["is_success"]`` on every step and reproduces its episode from ``reset(seed=...)``.
"""
from __future__ import annotations

from typing import Callable

import gymnasium as gym


def _make_robomimic(**kwargs) -> gym.Env:
    from envs.robomimic import RobomimicEnv  # lazy: importing robosuite takes seconds

    return RobomimicEnv(**kwargs)


def _make_toy(**kwargs) -> gym.Env:
    from envs.toy import ToyReachEnv

    return ToyReachEnv(**kwargs)


ENV_REGISTRY: dict[str, Callable[..., gym.Env]] = {
    "robomimic": _make_robomimic,
    "toy": _make_toy,
}


def make_env(name: str, **kwargs) -> gym.Env:
    """Build a registered env by name; ``kwargs`` go to its constructor (e.g. ``task="lift"``)."""
    if name not in ENV_REGISTRY:
        raise KeyError(f"unknown env {name!r}; known envs: {sorted(ENV_REGISTRY)}")
    return ENV_REGISTRY[name](**kwargs)
