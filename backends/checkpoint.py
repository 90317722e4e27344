"""Checkpoint folders of the backends: safetensors weights, JSON configs, and a ``manifest.json`` holding the
sha256 of every file that defines what the checkpoint computes, checked on every load (the policies' pattern,
written here so that ``backends/`` does not import ``policies/``). No pickles."""
from __future__ import annotations

import json
from pathlib import Path

from bac.files import file_sha256, write_atomic


def write_manifest(directory: str | Path, files: list[str]) -> None:
    """Record the sha256 of ``files`` (names inside ``directory``) under ``manifest.json``'s ``files`` key."""
    d = Path(directory)
    path = d / "manifest.json"
    manifest = json.loads(path.read_text()) if path.exists() else {}
    manifest["files"] = {name: file_sha256(d / name) for name in sorted(files)}
    write_atomic(path, json.dumps(manifest, indent=2) + "\n")


def verify_manifest(directory: str | Path) -> None:
    """Raise naming the file if one recorded in ``manifest.json`` is missing or changed since it was saved."""
    d = Path(directory)
    path = d / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the checkpoint cannot be checked (save it with its save function)")
    for name, sha in json.loads(path.read_text()).get("files", {}).items():
        if not (d / name).exists():
            raise FileNotFoundError(f"{d / name} is recorded in {path} but missing")
        now = file_sha256(d / name)
        if now != sha:
            raise ValueError(f"{d / name} does not match the sha256 recorded in {path} ({sha[:12]}..., now {now[:12]}...): "
                             "the file changed after the checkpoint was saved")
