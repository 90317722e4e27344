"""Milliseconds per action chunk of the tiny lerobot adapters, with and without a cache (docs/lerobot.md).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m integrations.lerobot.timing [--reps 30] [--batch 1]

Per adapter, at batch B and K = 10 Euler steps: no engine; the engine computing everything (uniform, S = K);
uniform with S = 5 and S = 3 updates per block. The cells are timed interleaved, round by round, warm-up excluded;
the table gives the median (and p90) over the rounds and the blocks' computed fraction. One torch thread.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from bac.methods import build_cache
from bac.protocol import attach_to
from integrations.lerobot.adapters import ADAPTERS, make_adapter


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    workdir = tempfile.mkdtemp(prefix="bac_lerobot_")
    cells = [("none", None), ("uniform S=10 (all)", 10), ("uniform S=5", 5), ("uniform S=3", 3)]
    print(f"device cpu, torch {torch.__version__}, 1 thread, batch {args.batch}, K=10, {args.reps} rounds")
    print(f"{'adapter':8s} {'cache':20s} {'median ms':>10s} {'p90 ms':>8s} {'computed':>9s} {'max|da|':>9s}")
    for name in ADAPTERS:
        ad = make_adapter(name, num_steps=10, workdir=workdir)
        obs = ad.calibration_obs(args.batch)
        ref = ad.sample(obs, None, seed=0)
        schedules = {c: build_cache(ad, {"name": "uniform", "n_updates": s}) for c, s in cells if s is not None}
        times: dict[str, list[float]] = {c: [] for c, _ in cells}
        diffs, fracs = {}, {}
        for r in range(args.reps + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            out = ad.sample(obs, None, seed=0)  # no engine on the model
            times["none"].append((time.perf_counter() - t0) * 1e3)
            engine = attach_to(ad, None)
            ad.sample(obs, engine, seed=0)  # the engine's first call traces the block order (untimed)
            for c, sched in schedules.items():
                engine.set_schedule(sched)
                engine.reset_stats()
                t0 = time.perf_counter()
                out = ad.sample(obs, engine, seed=0)
                times[c].append((time.perf_counter() - t0) * 1e3)
                fracs[c] = float(engine.computed.sum() / (engine.computed.sum() + engine.reused.sum()))
                diffs[c] = float((out - ref).abs().max())
            engine.detach()
        fracs["none"], diffs["none"] = 1.0, 0.0
        for c, _ in cells:
            t = np.array(times[c][2:])
            print(f"{name:8s} {c:20s} {np.median(t):10.2f} {np.percentile(t, 90):8.2f} {fracs[c]:9.2f} {diffs[c]:9.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
