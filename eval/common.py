"""Helpers every entry point of eval/ shares: paths, devices, atomic writes, aligned tables, cache defaults.

Entry points import from here (and from eval/latency.py, eval/frontier_grid.py); none imports another entry point
except to run it (eval/frontier.py runs eval/run.py's ``evaluate`` per cell), so eval/ has no import circle.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from bac.files import write_atomic  # noqa: F401 (the entry points import it from here)

ROOT = Path(__file__).resolve().parents[1]


def resolve_path(p: str) -> Path:
    """``p`` as given if absolute or found from the working directory, else relative to the repository."""
    path = Path(p)
    return path if path.is_absolute() or path.exists() else ROOT / path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but torch sees no CUDA device")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """The device in words, as every summary records it: the CUDA device's name, or the CPU model and threads."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu ({name}, {torch.get_num_threads()} thread(s))"


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def print_columns(lines: list[list[str]]) -> None:
    """Print rows of strings as aligned columns; the first row is the header."""
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    for j, r in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def method_defaults(name: str) -> dict:
    """A cache method's knobs from ``configs/cache/<name>.yaml``."""
    path = ROOT / "configs" / "cache" / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ValueError(f"unknown cache {name!r}; known caches: {known}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def bench_keys(policy) -> list[str]:
    """The observation keys a policy reads: its ``obs_keys`` and, for a policy with object tokens (the VLA), the
    per-object keys and ``object_present`` where a file holds them."""
    return list(policy.config.obs_keys) + [*getattr(policy.config, "object_keys", []), "object_present"]


def load_bench_obs(policy, checkpoint: Path, n: int, task: str | None = None) -> dict:
    """Held-out observations (key -> (N, To, ...)): numeric keys as tensors, an instruction as a numpy text array.
    DP-T's come from eval/calibrate.py (drawn from the demos); a VLA's from eval/record_obs.py (closed loop), one
    file per task. With ``task``, that task's file is read; the task-less ``bench_obs.npz`` stands in only when its
    sidecar does not name another task (a multi-task checkpoint must not be timed on the wrong scene's images)."""
    path = bench_obs_file(policy, checkpoint, task)
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in policy.config.obs_keys if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks observation keys {missing} that the policy reads")
        return as_torch({k: z[k][:n] for k in bench_keys(policy) if k in z.files})


def bench_obs_file(policy, checkpoint: Path, task: str | None = None) -> Path:
    """Which held-out observation file ``load_bench_obs`` reads for ``task`` (see there); a missing or mismatched one
    is named with the command that records it."""
    from policies.cache_target import bench_obs_path

    language = "instruction" in policy.config.obs_keys
    maker = (f"python eval/record_obs.py env=robomimic_lang{f' env.task={task}' if task else ''} policy=vla "
             f"policy.checkpoint={checkpoint}" if language else f"python eval/calibrate.py policy.checkpoint={checkpoint}")
    if task:
        own = bench_obs_path(checkpoint, task)
        if own.exists():
            return own
    path = bench_obs_path(checkpoint)
    if not path.exists():
        wanted = bench_obs_path(checkpoint, task) if task and language else path
        raise FileNotFoundError(f"{wanted} is missing; make it with `{maker}`")
    sidecar = path.with_suffix(".json")
    recorded = json.loads(sidecar.read_text()).get("task") if sidecar.exists() else None
    if task and recorded and recorded != task:
        raise ValueError(f"{path} holds observations of task {recorded!r}, not {task!r}; record {task}'s with `{maker}`")
    return path


def slice_obs(obs: dict, i: int, device) -> dict:
    """Row ``i`` of an observation batch as a batch of one on ``device`` (text stays a numpy array)."""
    return {k: v[i : i + 1].to(device) if isinstance(v, torch.Tensor) else v[i : i + 1] for k, v in obs.items()}


def write_out(path: Path | None, md: str, section: str | None = None) -> None:
    """Write ``md`` to ``path`` (None: print it); with ``section``, only between the file's
    ``<!-- section:start -->`` and ``<!-- section:end -->`` lines, which must each occur once, in that order
    (the rest of the file stays)."""
    if path is None:
        print(md)
        return
    if section is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(md)
        return
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    text = path.read_text() if path.exists() else ""
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        raise ValueError(f"{path} must hold one {start!r} and, after it, one {end!r} to write section {section!r}; "
                         f"it holds {text.count(start)} and {text.count(end)}")
    head, rest = text.split(start)
    tail = rest.split(end)[1]
    path.write_text(f"{head}{start}\n{md.strip()}\n{end}{tail}")


def as_torch(batch: dict[str, np.ndarray]) -> dict:
    """Numeric observation arrays as tensors (sharing memory); text (an instruction) stays a numpy array."""
    return {k: torch.from_numpy(v) if v.dtype.kind in "biuf" else v for k, v in batch.items()}
