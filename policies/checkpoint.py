"""Checkpoints: a folder with safetensors weights, a JSON config, normalizer statistics and a record.

```
<dir>/model.safetensors    EMA weights of the policy (what is evaluated)
<dir>/config.json          the policy config (policy_type selects the class)
<dir>/normalizer.json      min/max statistics per field
<dir>/train_record.json    dataset path and sha256, steps, loss curve, wall time, command
```
No pickles: everything loads with ``safetensors`` and ``json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from policies.diffusion_policy import DiffusionTransformerPolicy, DPTConfig
from policies.normalizer import Normalizer

POLICY_REGISTRY = {"dpt": (DiffusionTransformerPolicy, DPTConfig)}
CHECKPOINT_FILES = ("model.safetensors", "config.json", "normalizer.json")


def save_policy(policy, directory: str | Path, record: dict | None = None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(policy.config_dict(), indent=2) + "\n")
    (d / "normalizer.json").write_text(json.dumps(policy.normalizer.to_dict()) + "\n")
    if record is not None:
        (d / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")


def load_policy(directory: str | Path, device: str | torch.device = "cpu", **overrides):
    """Load a policy folder; ``overrides`` replace config fields (e.g. ``num_inference_steps=10, scheduler="ddim"``)."""
    d = Path(directory)
    for name in CHECKPOINT_FILES:
        if not (d / name).exists():
            raise FileNotFoundError(
                f"checkpoint file {d / name} is missing; train one with "
                f"`python eval/train.py --dataset data/<task>.hdf5 --out {d}`"
            )
    cfg = json.loads((d / "config.json").read_text())
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    kind = cfg.get("policy_type", "dpt")
    if kind not in POLICY_REGISTRY:
        raise ValueError(f"{d / 'config.json'} names policy_type {kind!r}; known: {sorted(POLICY_REGISTRY)}")
    cls, cfg_cls = POLICY_REGISTRY[kind]
    policy = cls(cfg_cls(**cfg), Normalizer(json.loads((d / "normalizer.json").read_text())))
    policy.load_state_dict(load_file(str(d / "model.safetensors")))
    return policy.to(device).eval()
