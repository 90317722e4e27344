"""Demonstrations in the robomimic hdf5 layout, cut into training windows.

Layout read here (robomimic's): ``data/demo_N/obs/<key>`` (L, d), ``data/demo_N/actions`` (L, Da), with
``data.attrs["env_args"]`` a JSON string describing the env. A user's robomimic ``low_dim.hdf5`` reads
through the same code.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np

from bac.files import file_sha256  # noqa: F401 (policies.data.file_sha256 is imported by callers)

ROBOMIMIC_LOW_DIM_KEYS = ["object", "robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"]


def _demo_order(name: str) -> int:
    m = re.fullmatch(r"demo_(\d+)", name)
    return int(m.group(1)) if m else 1 << 30


def default_obs_keys(path: str | Path) -> list[str]:
    """The robomimic low-dim keys when the file has them all, else every obs key of the first demo, sorted."""
    with h5py.File(path, "r") as f:
        first = sorted(f["data"].keys(), key=_demo_order)[0]
        keys = sorted(f["data"][first]["obs"].keys())
    return ROBOMIMIC_LOW_DIM_KEYS if set(ROBOMIMIC_LOW_DIM_KEYS) <= set(keys) else keys


def load_demos(path: str | Path, obs_keys: list[str]) -> tuple[dict, list[dict[str, np.ndarray]]]:
    """Read every demo: returns (env_meta, [{"obs": (L, Do) keys concatenated in order, "actions": (L, Da)}])."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset {path} does not exist; make one with `python eval/collect.py --task <task> --out {path}`")
    demos = []
    with h5py.File(path, "r") as f:
        if "data" not in f:
            raise ValueError(f"{path} is not in the robomimic layout: it has no 'data' group (top level: {sorted(f.keys())})")
        env_meta = json.loads(f["data"].attrs.get("env_args", "{}"))
        names = sorted(f["data"].keys(), key=_demo_order)
        if not names:
            raise ValueError(f"{path} holds no demos under 'data'")
        for name in names:
            g = f["data"][name]
            missing = [k for k in obs_keys if k not in g["obs"]]
            if missing:
                raise KeyError(f"{path}:{name} lacks observation keys {missing}; it has {sorted(g['obs'].keys())}")
            obs = np.concatenate([np.asarray(g["obs"][k], np.float32).reshape(len(g["actions"]), -1) for k in obs_keys], -1)
            actions = np.asarray(g["actions"], np.float32)
            if not (np.all(np.isfinite(obs)) and np.all(np.isfinite(actions))):
                raise ValueError(f"{path}:{name} holds NaN or inf")
            demos.append({"obs": obs, "actions": actions})
    return env_meta, demos


def make_windows(
    demos: list[dict[str, np.ndarray]], horizon: int, n_obs_steps: int, n_action_steps: int
) -> tuple[np.ndarray, np.ndarray]:
    """All training windows of every demo, Diffusion Policy style.

    Each demo is padded by repeating its first step (To - 1 times) and its last step (Ta - 1 times), then
    every length-T window is taken. Returns obs (N, To, Do) — the first To steps of each window — and
    actions (N, T, Da).
    """
    pad_before, pad_after = n_obs_steps - 1, n_action_steps - 1
    obs_windows, act_windows = [], []
    for d in demos:
        obs = np.concatenate([d["obs"][:1].repeat(pad_before, 0), d["obs"], d["obs"][-1:].repeat(pad_after, 0)])
        act = np.concatenate([d["actions"][:1].repeat(pad_before, 0), d["actions"], d["actions"][-1:].repeat(pad_after, 0)])
        n = len(act) - horizon + 1
        if n <= 0:
            continue
        idx = np.arange(n)[:, None] + np.arange(horizon)[None, :]  # (n, T)
        obs_windows.append(obs[idx[:, :n_obs_steps]])
        act_windows.append(act[idx])
    if not act_windows:
        raise ValueError(f"no demo is long enough for a horizon of {horizon} steps")
    return np.concatenate(obs_windows), np.concatenate(act_windows)
