"""Time and check the VLA's prefix-token reuse across control steps (``policies.vla.TokenReuse``) on demo replays.

    python eval/vla_reuse.py --checkpoint checkpoints/vla --dataset data/lang/nut_assembly.hdf5 \\
        --thresholds 2 4 8 --max-age 4 --n-demos 6

Each demo is replayed as a robot would see it: the observation window at every replanning point (every
``n_action_steps`` steps, the first step repeated before the demo as in training), batch 1. At every point the plain
policy and each reuse setting run on the same observation from the same initial noise, in rotating order; the
reuse settings keep their tokens from the previous point of the same demo. Printed and written (``--out``, JSON):
per setting the share of image tokens recomputed, median prefix and whole-call milliseconds, the speedup of the
whole call against the plain policy, and the action chunk's error against the plain policy's (relative L2, mean
and 95th percentile; the plain row gives the plain policy against itself from other noise, the sampler's own
spread, for scale). Success in closed loop is ``eval/run.py ... policy.token_reuse_threshold=<t>``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from envs.objects import split_objects, task_of_file  # noqa: E402
from envs.recorder import demo_names  # noqa: E402
from eval.common import as_torch, resolve_path, write_atomic  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.vla import TokenReuse, VLAPolicy  # noqa: E402


def replay_windows(path: Path, policy: VLAPolicy, n_demos: int) -> list[list[dict[str, np.ndarray]]]:
    """The last ``n_demos`` demos of ``path``, each as its batch-1 observation windows at the replanning points."""
    c = policy.config
    keys = [f"{cam}_image" for cam in c.cameras] + list(c.state_keys)
    demos = []
    with h5py.File(path, "r") as f:
        task = task_of_file(f["data"].attrs.get("env_args", "{}")) if c.object_keys else None
        names = demo_names(f["data"])[-n_demos:]
        for name in names:
            g = f["data"][name]
            missing = [k for k in keys if k not in g["obs"]]
            if missing:
                raise KeyError(f"{path}:{name} lacks observation keys {missing} that the policy reads")
            data = {k: g["obs"][k][()] for k in keys}
            if task is not None:  # the object tokens: the file's ``object`` split by its task
                data.update({k: v for k, v in split_objects(task, g["obs"]["object"][()]).items() if k in c.object_keys})
            text = str(g.attrs["instruction"])
            L = len(g["actions"])
            windows = []
            for t in range(0, L, c.n_action_steps):
                idx = np.clip(np.arange(t - c.n_obs_steps + 1, t + 1), 0, L - 1)
                obs = {k: v[idx][None] for k, v in data.items()}
                obs["instruction"] = np.array([[text] * c.n_obs_steps])
                windows.append(obs)
            demos.append(windows)
    return demos


def run(policy: VLAPolicy, demos: list, settings: list[tuple[float, int | None]], seed: int) -> list[dict]:
    c = policy.config
    names = ["plain"] + [f"t={t:g},age={a}" for t, a in settings]
    ms = {n: {"prefix": [], "total": []} for n in names}
    errs = {n: [] for n in names[1:]}
    spread = []  # the plain policy against itself from other noise: the sampler's own spread, for scale
    reuses = {n: TokenReuse(t, a) for n, (t, a) in zip(names[1:], settings)}
    gen = torch.Generator().manual_seed(seed)
    rnd = 0
    for d, windows in enumerate(demos):
        for obs_np in windows:
            obs = as_torch(obs_np)
            noise = torch.randn(1, c.horizon, c.action_dim, generator=gen)
            order = names[rnd % len(names):] + names[: rnd % len(names)]  # rotating: no config always first
            rnd += 1
            outs = {}
            for n in order:
                timings = {}
                t0 = time.perf_counter()
                kw = {} if n == "plain" else {"token_reuse": reuses[n], "streams": [d]}
                outs[n] = policy.predict_action(obs, noise=noise, timings=timings, **kw)["action_pred"]
                ms[n]["total"].append(1e3 * (time.perf_counter() - t0))
                ms[n]["prefix"].append(1e3 * timings["prefix_s"])
            ref = outs["plain"]
            for n in names[1:]:
                errs[n].append(float((outs[n] - ref).norm() / ref.norm().clamp_min(1e-12)))
            other = policy.predict_action(obs, noise=torch.randn(noise.shape, generator=gen))["action_pred"]
            spread.append(float((other - ref).norm() / ref.norm().clamp_min(1e-12)))
    base = float(np.median(ms["plain"]["total"][2:]))
    rows = []
    for n in names:
        total = float(np.median(ms[n]["total"][2:]))  # the first two calls are warm-up
        row = {"setting": n, "prefix_ms": round(float(np.median(ms[n]["prefix"][2:])), 2), "total_ms": round(total, 2),
               "speedup": round(base / total, 3)}
        if n == "plain":
            row.update(other_noise_rel_l2_mean=round(float(np.mean(spread)), 5),
                       other_noise_rel_l2_p95=round(float(np.percentile(spread, 95)), 5))
        else:
            r = reuses[n]
            row.update(threshold=r.threshold, max_age=r.max_age, image_tokens_recomputed=round(r.recompute_fraction, 4),
                       action_rel_l2_mean=round(float(np.mean(errs[n])), 5),
                       action_rel_l2_p95=round(float(np.percentile(errs[n], 95)), 5))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/vla")
    p.add_argument("--dataset", required=True, help="demos with the policy's cameras, state keys and instructions")
    p.add_argument("--thresholds", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    p.add_argument("--max-age", type=int, default=4, help="0: never refresh a kept token by age")
    p.add_argument("--n-demos", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows here as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy = load_policy(resolve_path(args.checkpoint))
    if not isinstance(policy, VLAPolicy):
        raise SystemExit(f"{args.checkpoint} is not a VLA checkpoint (token reuse is the VLA prefix's)")
    demos = replay_windows(resolve_path(args.dataset), policy, args.n_demos)
    age = args.max_age or None
    rows = run(policy, demos, [(t, age) for t in args.thresholds], args.seed)
    n_calls = sum(len(w) for w in demos)
    print(f"{args.checkpoint}: {len(demos)} demos, {n_calls} replanning points, batch 1, "
          f"{torch.get_num_threads()} thread(s)")
    print(f"{'setting':>18} {'tokens':>7} {'prefix ms':>10} {'call ms':>8} {'speedup':>8} {'rel-L2 mean':>12} {'p95':>8}")
    for r in rows:
        tok = f"{100 * r['image_tokens_recomputed']:.0f}%" if "image_tokens_recomputed" in r else "100%"
        key = "action_rel_l2" if "action_rel_l2_mean" in r else "other_noise_rel_l2"
        err = f"{r[key + '_mean']:>12.4f} {r[key + '_p95']:>8.4f}"
        print(f"{r['setting']:>18} {tok:>7} {r['prefix_ms']:>10.2f} {r['total_ms']:>8.2f} {r['speedup']:>8.3f} {err}")
    if args.out:
        write_atomic(Path(args.out), json.dumps({"checkpoint": args.checkpoint, "dataset": args.dataset,
                                                 "n_demos": len(demos), "n_calls": n_calls, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
