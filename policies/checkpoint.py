"""Checkpoints: a folder with safetensors weights, a JSON config, normalizer statistics and a record.

```
<dir>/model.safetensors    EMA weights of the policy (what is evaluated)
<dir>/config.json          the policy config (policy_type selects the class)
<dir>/normalizer.json      min/max statistics per field
<dir>/train_record.json    dataset path and sha256, steps, loss curve, wall time, command
<dir>/manifest.json        "weights": sha256 of the weights and normalizer and the function-defining config,
                           checked by every load (eval/manifest.py adds how the checkpoint was made and measured)
```
No pickles: everything loads with ``safetensors`` and ``json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bac.files import file_sha256, write_atomic
from policies.diffusion_policy import DiffusionTransformerPolicy, DPTConfig
from policies.normalizer import Normalizer
from policies.vla import VLAConfig, VLAPolicy

POLICY_REGISTRY = {"dpt": (DiffusionTransformerPolicy, DPTConfig), "vla": (VLAPolicy, VLAConfig)}
CHECKPOINT_FILES = ("model.safetensors", "config.json", "normalizer.json")
# Config fields chosen at inference time; every other field defines the function the weights compute.
INFERENCE_FIELDS = ("num_inference_steps", "scheduler", "n_action_steps")


def weights_record(directory: Path) -> dict:
    """What the weights were saved with: the sha256 of ``model.safetensors`` and ``normalizer.json`` and the
    config fields that define the model's function (``manifest.json``'s ``weights`` block)."""
    cfg = json.loads((directory / "config.json").read_text())
    return {"model_sha256": file_sha256(directory / "model.safetensors"),
            "normalizer_sha256": file_sha256(directory / "normalizer.json"),
            "config": {k: v for k, v in sorted(cfg.items()) if k not in INFERENCE_FIELDS}}


def write_weights_record(directory: Path) -> None:
    """Record the weights' hashes and function-defining config in ``manifest.json`` (other keys are kept)."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest["weights"] = weights_record(directory)
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")


def verify_weights(directory: Path) -> None:
    """Compare a checkpoint with its ``manifest.json`` record (where it has one): a changed weight or normalizer
    file, or an edited function-defining config field (n_head, beta_schedule, ...), is an error naming it."""
    path = directory / "manifest.json"
    recorded = json.loads(path.read_text()).get("weights") if path.exists() else None
    if not recorded:
        return
    now = weights_record(directory)
    for name, key in (("model.safetensors", "model_sha256"), ("normalizer.json", "normalizer_sha256")):
        if now[key] != recorded[key]:
            raise ValueError(f"{directory / name} does not match the sha256 recorded in {path} ({recorded[key][:12]}..., "
                             f"now {now[key][:12]}...): the file changed after the checkpoint was saved")
    changed = {k: (recorded["config"].get(k), now["config"].get(k))
               for k in set(recorded["config"]) | set(now["config"]) if recorded["config"].get(k) != now["config"].get(k)}
    if changed:
        said = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in sorted(changed.items()))
        raise ValueError(f"{directory / 'config.json'} differs from the config the weights were saved with ({said}); "
                         f"these fields change what the model computes. Inference-time options ({', '.join(INFERENCE_FIELDS)}) "
                         "are given as overrides instead")


def save_policy(policy, directory: str | Path, record: dict | None = None) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(policy.config_dict(), indent=2) + "\n")
    (d / "normalizer.json").write_text(json.dumps(policy.normalizer.to_dict()) + "\n")
    if record is not None:
        (d / "train_record.json").write_text(json.dumps(record, indent=2) + "\n")
    write_weights_record(d)


def load_policy(directory: str | Path, device: str | torch.device = "cpu", **overrides):
    """Load a policy folder; ``overrides`` replace config fields (e.g. ``num_inference_steps=10, scheduler="ddim"``)."""
    d = Path(directory)
    for name in CHECKPOINT_FILES:
        if not (d / name).exists():
            raise FileNotFoundError(
                f"checkpoint file {d / name} is missing; train one with "
                f"`python eval/train.py --dataset data/<task>.hdf5 --out {d}`"
            )
    verify_weights(d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    kind = cfg.get("policy_type", "dpt")
    if kind not in POLICY_REGISTRY:
        raise ValueError(f"{d / 'config.json'} names policy_type {kind!r}; known: {sorted(POLICY_REGISTRY)}")
    cls, cfg_cls = POLICY_REGISTRY[kind]
    policy = cls(cfg_cls(**cfg), Normalizer(json.loads((d / "normalizer.json").read_text())))
    policy.load_state_dict(load_file(str(d / "model.safetensors")))
    return policy.to(device).eval()
