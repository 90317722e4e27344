"""Our demos (robomimic-layout hdf5, ``envs/recorder.py``) as a LeRobotDataset v3.0 on local disk, and back.

    root = export_demos("data/toy.hdf5", "out/toy_lerobot", fps=10, task="reach the goal")
    env_meta, demos = read_lerobot(root)      # the same (env_meta, demos) as envs.recorder.read_demos

The mapping (lerobot's feature names on the left):

  observation.state           (Do,) float32: the low-dim obs keys side by side, in sorted key order; the feature's
                              ``names`` are ``<key>.<i>``, so reading back splits them again
  observation.images.<key>    (H, W, 3) uint8 image obs (a demo key of shape (L, H, W, 3)), written as PNG frames
                              (image mode: no video encoding, so nothing is lost and torchcodec is not needed)
  action                      (Da,) float32
  next.reward, next.done      (1,) float32 / (1,) bool
  episode_index, frame_index  lerobot's own: one episode per demo, in demo order

The env metadata (``env_args``) and each demo's reset seed go into ``meta/bac_demos.json`` beside lerobot's
``meta/info.json``; lerobot ignores the file. Everything runs offline: the dataset is created and opened with
an explicit ``root``, so the Hub is never asked.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from envs.recorder import read_demos

STATE, ACTION, REWARD, DONE = "observation.state", "action", "next.reward", "next.done"
IMAGE_PREFIX = "observation.images."
SIDECAR = "meta/bac_demos.json"


def _is_image(arr: np.ndarray) -> bool:
    return arr.ndim == 4 and arr.shape[-1] == 3 and arr.dtype == np.uint8  # (L, H, W, 3)


def demo_features(demo: dict) -> tuple[dict, list[str], list[str]]:
    """LeRobot ``features`` for demos shaped like ``demo``, and its low-dim and image obs keys (sorted)."""
    low = sorted(k for k, v in demo["obs"].items() if not _is_image(v))
    img = sorted(k for k, v in demo["obs"].items() if _is_image(v))
    names = [f"{k}.{i}" for k in low for i in range(demo["obs"][k].reshape(len(demo["actions"]), -1).shape[1])]
    feats = {
        STATE: {"dtype": "float32", "shape": (len(names),), "names": names},
        ACTION: {"dtype": "float32", "shape": (demo["actions"].shape[1],), "names": None},
        REWARD: {"dtype": "float32", "shape": (1,), "names": None},
        DONE: {"dtype": "bool", "shape": (1,), "names": None},
    }
    for k in img:
        feats[IMAGE_PREFIX + k] = {"dtype": "image", "shape": demo["obs"][k].shape[1:],
                                   "names": ["height", "width", "channels"]}
    return feats, low, img


def export_demos(demo_path: str | os.PathLike, root: str | os.PathLike, fps: int = 10, task: str = "",
                 repo_id: str = "bac/demos", robot_type: str | None = None) -> Path:
    """Write every demo of ``demo_path`` as one episode of a new LeRobotDataset v3.0 at ``root`` (which must not
    exist yet); return ``root``. ``task``: the language instruction stored with every frame (lerobot needs one)."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    env_meta, demos = read_demos(demo_path)
    if not demos:
        raise ValueError(f"{demo_path} holds no demos")
    feats, low, img = demo_features(demos[0])
    ds = LeRobotDataset.create(repo_id=repo_id, fps=int(fps), features=feats, root=root, robot_type=robot_type,
                               use_videos=False)
    for demo in demos:
        L = len(demo["actions"])
        state = np.concatenate([demo["obs"][k].reshape(L, -1) for k in low], axis=1).astype(np.float32)  # (L, Do)
        rewards = np.zeros(L, np.float32) if demo["rewards"] is None else demo["rewards"]
        dones = np.zeros(L, bool) if demo["dones"] is None else demo["dones"].astype(bool)
        for t in range(L):
            frame = {STATE: state[t], ACTION: demo["actions"][t].astype(np.float32),
                     REWARD: np.float32(rewards[t]).reshape(1), DONE: np.bool_(dones[t]).reshape(1), "task": task}
            for k in img:
                frame[IMAGE_PREFIX + k] = demo["obs"][k][t]  # (H, W, 3) uint8
            ds.add_frame(frame)
        ds.save_episode()
    ds.finalize()
    sidecar = {"env_args": env_meta, "demos": [{"name": d["name"], "seed": d["seed"]} for d in demos],
               "source": str(demo_path)}
    (Path(root) / SIDECAR).write_text(json.dumps(sidecar, indent=1))
    return Path(root)


def read_lerobot(root: str | os.PathLike, repo_id: str = "bac/demos") -> tuple[dict, list[dict]]:
    """Read a LeRobotDataset at ``root`` back into ``envs.recorder.read_demos``'s ``(env_meta, demos)``: per episode
    ``{"name", "obs": {key: (L, d) float32 or (L, H, W, 3) uint8}, "actions", "rewards", "dones", "seed"}``."""
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset(repo_id, root=root)
    sidecar_path = Path(root) / SIDECAR
    sidecar = json.loads(sidecar_path.read_text()) if sidecar_path.exists() else {"env_args": {}, "demos": []}
    names = ds.meta.features[STATE]["names"]
    keys = list(dict.fromkeys(n.rsplit(".", 1)[0] for n in names))  # low-dim keys in stored order
    width = {k: sum(n.rsplit(".", 1)[0] == k for n in names) for k in keys}
    img_keys = [f for f in ds.meta.features if f.startswith(IMAGE_PREFIX)]
    frames: dict[int, list[dict]] = {}
    for i in range(len(ds)):
        item = ds[i]
        frames.setdefault(int(item["episode_index"]), []).append(item)
    demos = []
    for ep in sorted(frames):
        items = sorted(frames[ep], key=lambda it: int(it["frame_index"]))
        state = np.stack([it[STATE].numpy() for it in items])  # (L, Do)
        obs, start = {}, 0
        for k in keys:
            obs[k] = state[:, start : start + width[k]]
            start += width[k]
        for f in img_keys:  # lerobot decodes images to float (3, H, W) in [0, 1]; PNG is lossless
            chw = np.stack([it[f].numpy() for it in items])
            obs[f[len(IMAGE_PREFIX):]] = np.rint(chw * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (L, H, W, 3)
        meta = sidecar["demos"][ep] if ep < len(sidecar["demos"]) else {"name": f"demo_{ep}", "seed": None}
        demos.append({
            "name": meta["name"], "obs": obs,
            "actions": np.stack([it[ACTION].numpy() for it in items]),
            "rewards": np.stack([it[REWARD].numpy() for it in items]).reshape(-1).astype(np.float32),  # (L,): lerobot
            "dones": np.stack([it[DONE].numpy() for it in items]).reshape(-1).astype(np.int64),  # reads (1,) as a scalar
            "seed": meta["seed"],
        })
    return sidecar["env_args"], demos
