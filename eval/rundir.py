"""A run folder that survives: one writer at a time, episodes keyed by seed (a rerun resumes), videos, the table.

``summary.json`` is written atomically (``eval.common.write_atomic``); ``episodes.jsonl`` is appended one line per
finished episode, so a crash keeps what finished.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from bac.rollout import EpisodeResult
from eval.common import print_columns


@contextmanager
def run_lock(out_dir: Path):
    """One run per results folder: ``.run.lock`` holds the writer's pid; a second run into a folder whose writer
    is alive is refused (a lock left by a dead process is taken over)."""
    lock = out_dir / ".run.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            except PermissionError:
                pass  # alive, another user's
            raise FileExistsError(f"{out_dir} is being written by another run (pid {pid}); wait for it or choose "
                                  "another folder") from None
    else:
        raise FileExistsError(f"could not take the lock {lock}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def finished_episodes(path: Path, seeds: list[int], resume: bool) -> dict[int, EpisodeResult]:
    """The episodes of ``seeds`` already in a run folder's ``episodes.jsonl`` (one per seed, the last line
    wins). Without ``resume`` a folder that holds episodes is refused: appending to it would mix two runs."""
    if not path.exists() or path.stat().st_size == 0:
        return {}
    if not resume:
        raise FileExistsError(f"{path} already holds episodes of another run; pass eval.resume=true to continue "
                              "that run (finished seeds are skipped) or write into a new folder")
    text = path.read_text()
    if not text.endswith("\n"):  # a line cut by a crash: new episodes go on a line of their own
        with open(path, "a") as f:
            f.write("\n")
    found = {}
    for i, line in enumerate(text.splitlines()):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash mid-write: that episode runs again
            print(f"warning: {path} line {i + 1} is not JSON and is ignored", flush=True)
            continue
        if d.get("seed") in seeds:
            found[d["seed"]] = EpisodeResult(**d)
    return found


def write_videos(out_dir: Path, results, record: list[bool], fps: int) -> None:
    import imageio

    vid_dir = out_dir / "videos"
    vid_dir.mkdir(exist_ok=True)
    for r, rec in zip(results, record):
        if rec and r.frames:
            tag = "success" if r.success else "fail"
            imageio.mimsave(vid_dir / f"seed{r.seed}_{tag}.mp4", np.stack(r.frames), fps=fps)


def print_table(rows: list[dict]) -> None:
    head = ["task", "cache", "loop", "episodes", "success [95% CI]", "lat p50 ms", "lat p95 ms", "lat p99 ms", "inf Hz",
            "ctrl Hz", "misses", "stale", "age ms", "FLOPs", "device"]
    lines = [head]
    for s in rows:
        lo, hi = s["success_ci95"]
        lines.append([
            s["task"], s["cache"], s.get("loop", "offline"), str(s["n_episodes"]),
            f"{s['success_rate']:.2f} [{lo:.2f}, {hi:.2f}]", f"{s['latency_ms']['p50']:.1f}",
            f"{s['latency_ms']['p95']:.1f}", f"{s['latency_ms'].get('p99', float('nan')):.1f}",
            f"{s['inference_hz']:.2f}", f"{s['control_hz']:.2f}", str(s.get("deadline_misses", "-")),
            str(s.get("stale_dropped", "-")), "-" if s.get("action_age_ms") is None else f"{s['action_age_ms']:.0f}",
            f"{s.get('flops_ratio', 1.0):.3f}", s["device"],
        ])
    print_columns(lines)
