"""Demo files in robomimic's hdf5 layout, so our demos and a user's robomimic ``low_dim.hdf5`` read the same way.

Layout (robomimic v0.3)::

    data                      attrs: env_args (JSON of RobomimicEnv.env_meta()), total (samples over all demos)
    data/demo_<i>             attrs: num_samples (= L), seed (the reset seed that reproduces the episode);
                              language tasks also: instruction (the episode's phrasing), goal (what it names)
    data/demo_<i>/obs/<key>   (L, Do_key) float32, one dataset per low-dim key (object, robot0_eef_pos, ...);
                              (L, H, W, 3) uint8 for camera images (<camera>_image, as robomimic stores them)
    data/demo_<i>/actions     (L, Da) float32, the clean expert labels
    data/demo_<i>/rewards     (L,) float32
    data/demo_<i>/dones       (L,) int64, 1 at the last step only

``obs[t]`` is the observation the action ``actions[t]`` was chosen from.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import h5py
import numpy as np


class DemoWriter:
    """Append demos one at a time, flushing after each, to a new robomimic-layout hdf5 file.

    An existing ``path`` is never overwritten unless ``overwrite=True``; then the demos go to a temporary file beside
    it that replaces ``path`` only in ``close()``, so a crash keeps the old file (and leaves the partial one).
    Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, env_meta: dict, overwrite: bool = False):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} exists; refusing to overwrite it (pass overwrite=True / --overwrite)")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._replace = self.path.exists()
        self._write_path = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}") if self._replace else self.path
        # "w-" fails if the file appeared in between: we never clobber a file we did not create
        self._file = h5py.File(self._write_path, "w-")
        self._data = self._file.create_group("data")
        self._data.attrs["env_args"] = json.dumps(env_meta)
        self._data.attrs["total"] = 0
        self.num_demos = 0
        self.total = 0

    def add(
        self,
        obs: dict[str, np.ndarray],
        actions: np.ndarray,
        rewards: np.ndarray | None = None,
        dones: np.ndarray | None = None,
        seed: int | None = None,
        instruction: str | None = None,
        goal: str | None = None,
        attrs: dict | None = None,
    ) -> str:
        """Write one demo of L steps: ``obs[key]`` (L, d) or images (L, H, W, 3) uint8, ``actions`` (L, Da);
        return its group name."""
        if self._file is None:
            raise RuntimeError("DemoWriter is closed")
        actions = np.asarray(actions, dtype=np.float32)
        if actions.ndim != 2 or len(actions) == 0:
            raise ValueError(f"actions must be (L, Da) with L > 0, got shape {actions.shape}")
        L = len(actions)
        rewards = np.zeros(L, np.float32) if rewards is None else np.asarray(rewards, dtype=np.float32)
        if dones is None:
            dones = np.zeros(L, np.int64)
            dones[-1] = 1
        dones = np.asarray(dones, dtype=np.int64)
        for name, arr in [("rewards", rewards), ("dones", dones), *((f"obs/{k}", v) for k, v in obs.items())]:
            if len(arr) != L:
                raise ValueError(f"{name} has {len(arr)} steps but actions has {L}")

        name = f"demo_{self.num_demos}"
        grp = self._data.create_group(name)
        kw = dict(compression="gzip", compression_opts=4)
        for key, arr in obs.items():
            arr = np.asarray(arr)
            if is_image_key(key):
                if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
                    raise ValueError(f"obs[{key!r}] must be (L, H, W, 3) uint8 images, got {arr.shape} {arr.dtype}")
                grp.create_dataset(f"obs/{key}", data=arr, chunks=(1, *arr.shape[1:]), **kw)  # (L, H, W, 3)
                continue
            grp.create_dataset(f"obs/{key}", data=arr.astype(np.float32).reshape(L, -1), **kw)  # (L, d)
        grp.create_dataset("actions", data=actions, **kw)
        grp.create_dataset("rewards", data=rewards, **kw)
        grp.create_dataset("dones", data=dones, **kw)
        grp.attrs["num_samples"] = L
        if seed is not None:
            grp.attrs["seed"] = int(seed)
        if instruction is not None:
            grp.attrs["instruction"] = str(instruction)
        if goal is not None:
            grp.attrs["goal"] = str(goal)
        for key, value in (attrs or {}).items():  # e.g. collect.py's forced drop: the step it started at
            grp.attrs[key] = value
        self.num_demos += 1
        self.total += L
        self._data.attrs["total"] = self.total
        self._file.flush()
        return name

    def close(self) -> None:
        """Finish the file; in overwrite mode, atomically replace the old one."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._replace:
            os.replace(self._write_path, self.path)

    def abort(self) -> None:
        """Close without replacing the old file (the partial demos stay in the temporary file)."""
        if self._file is None:
            return
        self._file.close()
        self._file = None
        if self._replace:
            print(f"[recorder] kept {self.path}; partial demos left in {self._write_path}", file=sys.stderr)

    def __enter__(self) -> "DemoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def is_image_key(key: str) -> bool:
    """Camera observations are named ``<camera>_image`` (robomimic's convention)."""
    return key.endswith("_image")


def demo_names(data: h5py.Group) -> list[str]:
    """Demo group names in numeric order (demo_2 before demo_10)."""
    return sorted((k for k in data.keys() if k.startswith("demo_")), key=lambda k: int(k[len("demo_"):]))


def read_demos(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """Read a robomimic-layout file into ``(env_meta, demos)``.

    Each demo is ``{"name", "obs": {key: (L, d) or (L, H, W, 3) uint8}, "actions": (L, Da), "rewards": (L,),
    "dones": (L,), "seed", "instruction", "goal"}`` (None where the file does not store them: ``seed`` in
    robomimic's own datasets, ``instruction`` and ``goal`` outside the language tasks).
    """
    with h5py.File(path, "r") as f:
        data = f["data"]
        env_meta = json.loads(data.attrs["env_args"]) if "env_args" in data.attrs else {}
        demos = []
        for name in demo_names(data):
            g = data[name]
            seed = g.attrs.get("seed")
            demos.append(
                {
                    "name": name,
                    "obs": {k: g["obs"][k][()] for k in g["obs"].keys()},
                    "actions": g["actions"][()],
                    "rewards": g["rewards"][()] if "rewards" in g else None,
                    "dones": g["dones"][()] if "dones" in g else None,
                    "seed": None if seed is None else int(seed),
                    "instruction": _text(g.attrs.get("instruction")),
                    "goal": _text(g.attrs.get("goal")),
                }
            )
    return env_meta, demos


def _text(value) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)
