"""The examples run as a user runs them (a fresh process from the repository root) and their own checks hold."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str) -> str:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # this checkout's bac, not an installed one
    proc = subprocess.run([sys.executable, f"examples/{name}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_own_model_attaches_calibrates_schedules_samples_and_detaches():
    out = run_example("own_model.py")
    assert "compute-everything output identical: True" in out
    assert "detached; model restored: True" in out
    assert "of block calls computed" in out and "action MSE vs uncached" in out
