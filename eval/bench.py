"""Benchmark cache methods on one checkpoint, in one process, on one device, interleaved.

    python eval/bench.py env=robomimic env.task=can
    python eval/bench.py env=robomimic bench.caches=[none,uniform,bac] bench.n_updates=[5,10,20]
    python eval/bench.py env=robomimic bench.caches=[none,bac] bench.n_bubble=[2,3,5]   # BAC's top-n knob
    python eval/bench.py env=robomimic env.task=can bench=methods   # every literature method at 2-3 budgets

``bench.caches`` entries are cache names (the ablation rows sweep ``bench.n_updates`` and ``bench.n_bubble``; any
other method runs with its ``configs/cache/<name>.yaml``) or mappings ``{name: teacache, delta: 0.3}`` that
override a method's knobs (label ``teacache[delta=0.3]``).

For every cache config it times batch-1 ``predict_action`` (median and p95 over ``bench.trials`` rounds;
in each round every config runs once, so drift in machine load hits all of them alike), reports the
speedup against ``cache=none`` measured in the same rounds, the analytic FLOPs ratio, and the action MSE
against the uncached chunk from identical noise on held-out observations. It also times the per-step floor
(every block reused after step 0) and reports each config's speedup against the ceiling that floor leaves
(``floor_ceiling``). Writes ``bench.json``.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bac.metrics import latency_stats  # noqa: E402
from bac.timing import Timed, device_sync, time_interleaved  # noqa: E402
from eval.common import (device_name, load_bench_obs, method_defaults, pick_device, print_columns,  # noqa: E402,F401
                         resolve_path)
from policies import load_policy  # noqa: E402
from policies.cache_target import SCHEDULE_METHODS, disable_cache, enable_cache, make_cache  # noqa: E402


def bench(cfg: DictConfig, out_dir: Path) -> list[dict]:
    torch.set_num_threads(int(cfg.threads))
    device = pick_device(str(cfg.device))
    checkpoint = resolve_path(cfg.policy.checkpoint)
    policy = load_policy(checkpoint, device, num_inference_steps=cfg.policy.num_inference_steps,
                         scheduler=cfg.policy.scheduler)
    obs = load_bench_obs(policy, checkpoint, int(cfg.bench.n_obs), str(cfg.env.task))
    obs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in obs.items()}  # a VLA's instruction stays text
    configs = []  # (label, cache name, S, schedule or strategy, knobs)
    bubbles = cfg.bench.n_bubble if OmegaConf.is_list(cfg.bench.n_bubble) else [cfg.bench.n_bubble]
    for entry in cfg.bench.caches:
        if isinstance(entry, str) and entry in SCHEDULE_METHODS:
            for S in ([None] if entry == "none" else cfg.bench.n_updates):
                for n in (bubbles if entry == "bac" else [bubbles[0]]):
                    knobs = {"name": entry, "n_updates": int(S or 0), "n_bubble": int(n), "metric": str(cfg.bench.metric)}
                    label = entry if S is None else f"{entry}@S{S}" + (f"n{n}" if entry == "bac" and len(bubbles) > 1 else "")
                    configs.append((label, entry, S, make_cache(policy, checkpoint, knobs), knobs))
            continue
        given = {"name": entry} if isinstance(entry, str) else OmegaConf.to_container(entry, resolve=True)
        knobs = {**method_defaults(str(given["name"])), **given}
        shown = ",".join(f"{k}={v}" for k, v in given.items() if k != "name")
        label = given["name"] + (f"[{shown}]" if shown else "")
        configs.append((label, given["name"], knobs.get("n_updates"), make_cache(policy, checkpoint, knobs), knobs))

    def run(o, seed):
        gen = torch.Generator(device=device).manual_seed(seed)
        return policy.predict_action(o, generator=gen)["action"]

    # Action error: every config on every held-out observation, identical noise per observation.
    one = [{k: v[i : i + 1] for k, v in obs.items()} for i in range(next(iter(obs.values())).shape[0])]
    reference = [run(o, 1000 + i) for i, o in enumerate(one)]
    rows = {}
    for label, name, S, schedule, knobs in configs:
        engine = enable_cache(policy, schedule) if name != "none" else None
        mse = float(np.mean([(run(o, 1000 + i) - reference[i]).pow(2).mean().item() for i, o in enumerate(one)]))
        stats = engine.stats() if engine else {}
        rows[label] = {"cache": name, "knobs": knobs, "n_updates": S, "n_bubble": getattr(schedule, "n_bubble", None),
                       "action_mse": mse, "times": [],
                       "flops_ratio": engine.flops_ratio() if engine else 1.0,  # online strategies: what ran
                       "computed_fraction": stats.get("computed_fraction", 1.0),
                       "decision_ms_per_step": stats.get("decision_ms_per_step")}
        if engine:
            disable_cache(policy, engine)
    # The per-step floor: a run that computes every block at step 0 only (uniform, S = 1) costs one full step
    # plus K - 1 steps of what no cache removes (embedding, head, sampler step, dispatch). Timed in the same
    # rounds, it turns the FLOPs ceiling into the ceiling reachable with that floor (see ``floor_ceiling``).
    K = policy.config.num_inference_steps
    floor = make_cache(policy, checkpoint, {"name": "uniform", "n_updates": 1}) if "none" in rows and K > 1 else None
    # Latency: interleaved rounds; attach/detach between configs (off the clock) so `none` runs with no engine at all.
    timed = configs + ([("<floor>", "uniform", 1, floor, None)] if floor is not None else [])
    engines = {}

    def config(label: str, name: str, schedule) -> Timed:
        def attach(r: int) -> None:
            engines[label] = enable_cache(policy, schedule, profile=False) if name != "none" else None

        def detach(r: int) -> None:
            if engines[label] is not None:
                disable_cache(policy, engines[label])

        return Timed(label, lambda r: run(one[r % len(one)], r), attach, detach)

    times = time_interleaved([config(label, name, schedule) for label, name, _, schedule, _ in timed],
                             int(cfg.bench.trials), int(cfg.bench.warmup), device_sync(device))
    floor_times = times.pop("<floor>", [])
    for label, t in times.items():
        rows[label]["times"] = t
    base = np.median(rows["none"]["times"]) if "none" in rows else None
    floor_s = (np.median(floor_times) - base / K) / (K - 1) if floor_times else None
    out = []
    for label, row in rows.items():
        lat = latency_stats(row.pop("times"))
        med = lat["p50"] / 1e3
        ceiling = floor_ceiling(base, floor_s, K, row["flops_ratio"]) if floor_s is not None else None
        out.append({"config": label, **row, "latency_ms": {k: round(v, 2) for k, v in lat.items()},
                    "speedup": round(base / med, 2) if base else None,
                    "speedup_vs_flops": round((base / med) * row["flops_ratio"], 3) if base else None,
                    "floor_ceiling": round(ceiling, 2) if ceiling else None,
                    "speedup_vs_floor_ceiling": round(base / med / ceiling, 3) if ceiling else None,
                    "device": device_name(device)})
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"task": cfg.env.task, "checkpoint": str(cfg.policy.checkpoint), "scheduler": policy.config.scheduler,
            "num_inference_steps": policy.config.num_inference_steps, "n_emb": policy.config.n_emb,
            "n_layer": policy.config.n_layer, "trials": int(cfg.bench.trials), "n_obs": len(one),
            "torch_threads": torch.get_num_threads(), "device": device_name(device),
            "floor_ms_per_step": round(floor_s * 1e3, 4) if floor_s is not None else None,
            "uncached_ms_per_step": round(base / K * 1e3, 4) if base else None}
    (out_dir / "bench.json").write_text(json.dumps({"meta": meta, "rows": out}, indent=2) + "\n")
    print_bench(meta, out)
    print(f"results in {out_dir}")
    return out


def floor_ceiling(uncached_s: float, floor_s: float, K: int, flops_ratio: float) -> float:
    """The speedup a cache with ``flops_ratio`` could reach if its block work shrank with its FLOPs but every
    step still paid the per-step floor: ``T_none / (K * floor + flops_ratio * (T_none - K * floor))``. At batch 1
    on a CPU, a small model's floor is a sizeable share of a cached step, so this is the ceiling to hold an
    engine to; the FLOPs ratio alone (``speedup_vs_flops``) assumes the floor is free."""
    fixed = min(K * floor_s, uncached_s)
    return uncached_s / (fixed + flops_ratio * (uncached_s - fixed))


def print_bench(meta: dict, rows: list[dict]) -> None:
    print(f"{meta['task']}: {meta['scheduler']}-{meta['num_inference_steps']}, {meta['n_layer']} layers x "
          f"{meta['n_emb']}, {meta['trials']} interleaved rounds, {meta['device']}")
    head = ["config", "p50 ms", "p95 ms", "speedup", "FLOPs ratio", "speedup/ceiling", "floor-aware ceiling",
            "action MSE", "decide ms/step"]
    lines = [head] + [[
        r["config"], f"{r['latency_ms']['p50']:.1f}", f"{r['latency_ms']['p95']:.1f}", f"{r['speedup']:.2f}x",
        f"{r['flops_ratio']:.3f} ({1 / r['flops_ratio']:.1f}x)", f"{r['speedup_vs_flops']:.2f}",
        "-" if r.get("floor_ceiling") is None else f"{r['floor_ceiling']:.2f}x ({r['speedup_vs_floor_ceiling']:.2f})",
        f"{r['action_mse']:.2e}", "-" if r.get("decision_ms_per_step") is None else f"{r['decision_ms_per_step']:.3f}",
    ] for r in rows]
    print_columns(lines)
    if meta.get("floor_ms_per_step") is not None:
        print(f"per-step floor (every block reused): {meta['floor_ms_per_step']:.3f} ms, against "
              f"{meta['uncached_ms_per_step']:.3f} ms for an uncached step")


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    bench(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
