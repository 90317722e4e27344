"""Re-time every ``eval/generate.py`` run under a folder back to back, in one process, against one uncached
baseline: the speedups a table compares.

    python eval/generate_bench.py docs/dit_image --rounds 15

Each run's own speedup was timed in its own process, at whatever load the machine had then; here every row's
cache (an engine method or a peer, rebuilt from its summary.json) and ``cache=none`` are timed in the same
interleaved rounds (``bac.timing``), at each batch size of the runs' ``backend.timing_batches``. Writes
``<folder>/latency.json``; ``eval/generate_report.py`` takes the speedups from it when it is there.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bac.metrics import latency_stats  # noqa: E402
from bac.timing import device_sync, time_interleaved  # noqa: E402
from eval.common import device_name, pick_device, write_atomic  # noqa: E402
from eval.generate import load_backend, make_method, timed_sampling, timing_inputs  # noqa: E402
from eval.generate_report import load  # noqa: E402

SHARED = ("name", "checkpoint", "scheduler", "num_inference_steps", "guidance_scale", "n_calibration")


def bench(folder: Path, rounds: int, threads: int = 1, device: str = "cpu", seed: int = 0) -> dict:
    torch.set_num_threads(threads)
    rows = load([folder])
    backends = {tuple(r["summary"]["backend"][k] for k in SHARED) for r in rows}
    if len(backends) != 1:
        raise SystemExit(f"{folder}: the runs use different backends ({sorted(backends)}); bench one at a time")
    b = rows[0]["summary"]["backend"]
    batches = sorted({int(x) for r in rows for x in r["summary"]["backend"]["timing_batches"]})
    dev = pick_device(device)
    gen, targets = load_backend(b, dev)[0], {}
    configs = []
    for nb in batches:
        labels, noise = timing_inputs(gen, nb, seed)
        configs.append(timed_sampling(f"none@{nb}", gen, None, labels, noise))
        for r in rows:
            if r["method"] == "none":
                continue
            blocks = r["summary"].get("blocks", "units")
            target = targets.setdefault(blocks, load_backend(b, dev, blocks=blocks, gen=gen)[1])
            method = make_method(r["summary"]["cache"], target, seed)
            configs.append(timed_sampling(f"{r['row']}@{nb}", gen, method, labels, noise))
    t0 = time.time()
    times = time_interleaved(configs, rounds, 2, device_sync(dev))
    ms = {str(nb): {label.split("@")[0]: latency_stats(v) for label, v in times.items() if label.endswith(f"@{nb}")}
          for nb in batches}
    speedup = {str(nb): {row: float(np.median(times[f"none@{nb}"]) / np.median(times[f"{row}@{nb}"]))
                         for row in ms[str(nb)] if row != "none"} for nb in batches}
    out = {"folder": folder.as_posix(), "rounds": rounds, "warmup": 2, "threads": threads,
           "device": device_name(dev), "wall_s": round(time.time() - t0, 1),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "latency_ms": ms, "speedup": speedup}
    write_atomic(folder / "latency.json", json.dumps(out, indent=2) + "\n")
    for nb in batches:
        print(f"batch {nb}: " + ", ".join(f"{k} {v:.2f}x" for k, v in sorted(speedup[str(nb)].items(),
                                                                            key=lambda kv: -kv[1])))
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="a folder of generate runs of one backend (one subfolder per row)")
    p.add_argument("--rounds", type=int, default=15, help="interleaved rounds (2 warm-up rounds are added)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    return bench(a.folder, a.rounds, a.threads, a.device)


if __name__ == "__main__":
    main()
