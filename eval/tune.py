"""Choose how to run a policy under a latency budget on this device.

    python eval/tune.py env=robomimic env.task=can loop.budget_ms=40      # sampler, K and cache over the frontier
    python eval/tune.py env=robomimic cache=bac loop.budget_ms=100        # S of one cache method on the checkpoint's sampler
    python eval/tune.py env=robomimic env.task=can cache=uniform loop.budget_ms=50 tune.n_updates=[2,4,5,10]

Without a cache method (``cache=none``, the default) it chooses over the measured frontier of the task
(``docs/frontier/<task>/frontier.json``, made by eval/frontier.py): the cells whose frontier p95 is within twice
the budget are timed again here, at batch 1 in interleaved rounds, and among those whose p95 meets the budget the
one with the highest measured rollout success wins (the faster on a tie; ``bac.frontier.choose_for_budget``). It
prints the candidates and the ``eval/run.py`` command of the choice; ``eval/run.py loop.budget_ms=...`` without a
cache applies the same choice before its rollouts.

With a cache method it times batch-1 ``predict_action`` for every update budget S in ``tune.n_updates`` (interleaved rounds, as
eval/bench.py does) plus the uncached policy, then picks the largest S (the most computed steps, the best
quality) whose p95 latency meets ``loop.budget_ms``; the uncached policy wins if it meets the budget itself.
Prints the S -> latency -> Hz table, writes ``tune.json`` and the chosen ``schedule.json`` into the run folder,
and prints the ``eval/run.py`` command that uses it. ``eval/run.py loop.budget_ms=...`` applies the same rule
before its rollouts.
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
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from bac.frontier import choose_for_budget, choose_updates  # noqa: E402
from eval.common import (device_name, load_bench_obs, method_defaults, pick_device, print_columns,  # noqa: E402
                         resolve_path, write_atomic)
from eval.frontier_grid import cell_of  # noqa: E402
from eval.latency import measure_budgets, measure_cells  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.cache_target import make_schedule  # noqa: E402


def pick_budget(cfg, policy, checkpoint: Path, obs: dict, reuse: bool = True) -> dict:
    """``loop.budget_ms`` in eval/run.py and eval/deploy.py: ``cfg.cache.name``'s budget S, returned as {budget_ms,
    chosen, rows}. With ``reuse``, the choice eval/tune.py (or an earlier run) recorded for the same weights,
    sampler, method, budget and device within ``tune.max_age_h`` is taken as it was; otherwise the method is timed
    at ``cfg.tune.n_updates`` on the batch-1 observation ``obs`` (key -> (1, To, d) numpy) and the choice recorded."""
    if cfg.cache.name == "none":
        raise ValueError("loop.budget_ms picks a cache budget S; choose a cache method too, e.g. cache=bac")
    key = updates_key(cfg, policy)
    if reuse and (held := recall(cfg, key)) is not None:
        return held
    one = [{k: torch.from_numpy(v).to(policy.device) for k, v in obs.items()}]
    rows = measure_budgets(policy, checkpoint, str(cfg.cache.name), list(cfg.tune.n_updates), one, int(cfg.tune.trials),
                           int(cfg.tune.warmup), int(cfg.cache.get("n_bubble", 5)), str(cfg.cache.get("metric", "cosine")))
    chosen = choose_updates(rows, float(cfg.loop.budget_ms))
    print_tune(rows, chosen, float(cfg.loop.budget_ms))
    result = {"budget_ms": float(cfg.loop.budget_ms), "chosen": chosen, "rows": rows}
    remember(cfg, key, result)
    return result


# ------------------------------------------------------------------------------------------- tuning records
# A budget choice rests on timings, and two timings of the same configs minutes apart differ (this host's speed
# drifts by tens of percent). So the choice is recorded once, keyed by everything it depends on, and
# ``loop.budget_ms`` in eval/run.py and eval/deploy.py takes the recorded one: tune, then run, gives one answer.
def updates_key(cfg, policy) -> dict:
    """What one cache method's S choice depends on: the weights, the sampler, the method, the budget, the device."""
    from bac.engine import fingerprint

    pc = policy.config
    return {"kind": "n_updates", "model": fingerprint(policy.model), "scheduler": pc.scheduler,
            "K": pc.num_inference_steps, "method": str(cfg.cache.name), "n_bubble": int(cfg.cache.get("n_bubble", 5)),
            "metric": str(cfg.cache.get("metric", "cosine")), "n_updates": sorted(int(s) for s in cfg.tune.n_updates),
            "budget_ms": float(cfg.loop.budget_ms), "device": device_name(policy.device),
            "threads": torch.get_num_threads()}


def frontier_key(cfg, path: Path, device) -> dict:
    """What a choice over a measured frontier depends on: that frontier (its content), the checkpoint, the budget,
    the device."""
    from bac.files import file_sha256

    return {"kind": "frontier", "frontier": str(path.resolve()), "frontier_sha256": file_sha256(path),
            "checkpoint": str(resolve_path(cfg.policy.checkpoint).resolve()), "budget_ms": float(cfg.loop.budget_ms),
            "device": device_name(device), "threads": torch.get_num_threads()}


def record_path(cfg, key: dict) -> Path:
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(os.path.expanduser(str(cfg.tune.records))) / f"{key['kind']}_{digest}.json"


def recall(cfg, key: dict) -> dict | None:
    """The choice recorded for ``key`` within ``tune.max_age_h`` hours, or None (also with ``tune.retune=true``)."""
    import time

    path = record_path(cfg, key)
    if cfg.tune.get("retune", False) or not path.exists():
        return None
    try:
        rec = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # unreadable: measure again (and overwrite it)
    age_h = (time.time() - float(rec.get("made_s", 0))) / 3600
    if rec.get("key") != key or age_h > float(cfg.tune.max_age_h):
        return None
    chosen = rec["result"]["chosen"]
    what = chosen.get("label") or f"{chosen['cache']} S={chosen['n_updates']}"
    print(f"budget {key['budget_ms']:g} ms: using the choice tuned {age_h * 60:.0f} min ago on this device ({what}; "
          f"{path}); tune.retune=true times it again", flush=True)
    return rec["result"]


def remember(cfg, key: dict, result: dict) -> Path:
    import time

    path = record_path(cfg, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"key": key, "made_s": time.time(), "made": time.strftime("%Y-%m-%d %H:%M:%S"),
                                   "result": result}, indent=2) + "\n")
    return path


def tune_obs(policy, checkpoint: Path, n: int, task: str | None = None) -> list[dict]:
    obs = load_bench_obs(policy, checkpoint, n, task)
    m = next(iter(obs.values())).shape[0]
    return [{k: v[i : i + 1].to(policy.device) for k, v in obs.items()} for i in range(m)]


def print_tune(rows: list[dict], chosen: dict, budget_ms: float) -> None:
    lines = [["cache", "S", "p50 ms", "p95 ms", "Hz (1/p95)", "FLOPs ratio", "meets budget"]]
    for r in rows:
        lines.append([r["cache"], str(r["n_updates"]), f"{r['latency_ms']['p50']:.1f}", f"{r['latency_ms']['p95']:.1f}",
                      f"{r['hz']:.1f}", f"{r['flops_ratio']:.3f}", "yes" if r["latency_ms"]["p95"] <= budget_ms else "no"])
    print_columns(lines)
    verdict = "meets" if chosen["meets_budget"] else "does NOT meet (no config does; this is the fastest)"
    print(f"budget {budget_ms:g} ms: chose {chosen['cache']} S={chosen['n_updates']} "
          f"(p95 {chosen['latency_ms']['p95']:.1f} ms), which {verdict} the budget")


def frontier_path(cfg) -> Path:
    """``tune.frontier`` or, unset, the frontier that ``eval/frontier.py`` writes for this config (``frontier.out``:
    docs/frontier/<task>/ for DP-T, docs/frontier/vla/<task>/ with ``frontier=vla``)."""
    given = cfg.tune.get("frontier")
    if given:
        return resolve_path(str(given))
    out = Path(str(cfg.frontier.out))
    return (out if out.is_absolute() else ROOT / out) / "frontier.json"


def check_frontier_model(data: dict, path: Path, policy, checkpoint: Path) -> None:
    """Refuse a frontier measured on other weights (by model hash; a frontier from before the hash was recorded, by
    its checkpoint folder): its cells' success says nothing about these."""
    from policies.cache_target import policy_signature

    meta = data.get("meta", {})
    have, want = policy_signature(policy)[2], meta.get("model_hash")
    if want is not None:
        same = want == have
    else:
        same = "checkpoint" not in meta or resolve_path(str(meta["checkpoint"])).resolve() == checkpoint.resolve()
    if not same:
        raise ValueError(f"{path} was measured on {meta.get('checkpoint')} (model hash {want or 'not recorded'}), not on "
                         f"{checkpoint} (model hash {have}); measure this checkpoint's frontier (`python eval/frontier.py "
                         f"... policy.checkpoint=<it>`, frontier=vla for a VLA) or point tune.frontier at its frontier.json")


def pick_from_frontier(cfg, device, reuse: bool = True) -> dict:
    """Sampler, K and cache for ``loop.budget_ms`` over the task's measured frontier, with the p95 latencies
    measured again on ``device``: {budget_ms, frontier, chosen, meets_budget, rows}. With ``reuse``, a choice
    recorded for the same frontier, checkpoint, budget and device within ``tune.max_age_h`` is taken as it was."""
    budget = float(cfg.loop.budget_ms)
    path = frontier_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: measure the frontier first (`python eval/frontier.py "
                                f"env={cfg.env.name} env.task={cfg.env.task}`), or tune one method's S with cache=<method>")
    key = frontier_key(cfg, path, device)
    if reuse and (held := recall(cfg, key)) is not None:
        return held
    data = json.loads(path.read_text())
    checkpoint = resolve_path(cfg.policy.checkpoint)
    check_frontier_model(data, path, load_policy(checkpoint, device), checkpoint)
    rows = [r for r in data["rows"] if "success" in r and "latency_ms" in r]
    if not rows:
        raise ValueError(f"{path} has no cell with both rollouts and latency yet; run eval/frontier.py to the end")
    candidates = [r for r in rows if r["latency_ms"]["p95"] <= 2 * budget] or [min(rows, key=lambda r: r["latency_ms"]["p95"])]
    timed = measure_cells([cell_of(r) for r in candidates], resolve_path(cfg.policy.checkpoint), device, int(cfg.tune.trials),
                    int(cfg.tune.warmup), int(cfg.tune.n_obs), proxies=False, task=str(cfg.env.task))
    for r in candidates:
        r["latency_now_ms"] = timed[r["label"]]["latency_ms"]
    pick = choose_for_budget(candidates, budget, latency=lambda r: r["latency_now_ms"]["p95"],
                             successes=lambda r: (r["success"]["successes"], r["success"]["episodes"]))
    row = pick["row"]
    chosen = {"label": row["label"], "sampler": row["sampler"], "num_inference_steps": row["K"],
              "warm_start": int(row.get("start", 0)),
              "cache": {"name": row["cache"], **row.get("knobs", {})}, "success": row["success"],
              "latency_ms": row["latency_now_ms"]}
    table = [{"label": r["label"], "success": r["success"], "frontier_latency_ms": r["latency_ms"],
              "latency_now_ms": r["latency_now_ms"]} for r in candidates]
    print_frontier_choice(table, chosen, pick["meets_budget"], budget, path)
    result = {"budget_ms": budget, "frontier": str(path), "chosen": chosen, "meets_budget": pick["meets_budget"],
              "rows": table}
    remember(cfg, key, result)
    return result


def apply_choice(cfg, choice: dict):
    """``cfg`` with the frontier choice's sampler, K and cache (and no budget left to pick)."""
    from omegaconf import OmegaConf

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    c = choice["chosen"]
    out.policy.scheduler, out.policy.num_inference_steps = c["sampler"], c["num_inference_steps"]
    name = c["cache"]["name"]
    out.cache = OmegaConf.create({**(method_defaults(name) if name != "none" else {"name": "none"}), **c["cache"]})
    out.loop.budget_ms, out.loop.warm_start = None, c.get("warm_start", 0)
    return out


def print_frontier_choice(rows: list[dict], chosen: dict, meets: bool, budget_ms: float, path: Path) -> None:
    lines = [["config", "success [95% CI]", "episodes", "p95 ms (frontier)", "p95 ms (now)", "meets budget"]]
    for r in sorted(rows, key=lambda r: r["latency_now_ms"]["p95"]):
        s = r["success"]
        lines.append([r["label"], f"{s['rate']:.2f} [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}]", str(s["episodes"]),
                      f"{r['frontier_latency_ms']['p95']:.1f}", f"{r['latency_now_ms']['p95']:.1f}",
                      "yes" if r["latency_now_ms"]["p95"] <= budget_ms else "no"])
    print(f"frontier {path}: cells within 2x of the {budget_ms:g} ms budget, timed again on this device")
    print_columns(lines)
    verdict = "meets" if meets else "does NOT meet (no cell does; this is the fastest)"
    print(f"budget {budget_ms:g} ms: chose {chosen['label']} (success {chosen['success']['rate']:.2f} over "
          f"{chosen['success']['episodes']} episodes, p95 {chosen['latency_ms']['p95']:.1f} ms), which {verdict} the budget")


def run_command(cfg, chosen: dict) -> str:
    knobs = " ".join(f"cache.{k}={v}" for k, v in chosen["cache"].items() if k != "name")
    if chosen.get("warm_start"):
        knobs += f" loop.warm_start={chosen['warm_start']}"
    return (f"python eval/run.py env={cfg.env.name} env.task={cfg.env.task} policy.scheduler={chosen['sampler']} "
            f"policy.num_inference_steps={chosen['num_inference_steps']} cache={chosen['cache']['name']} {knobs}").strip()


def tune(cfg: DictConfig, out_dir: Path) -> dict:
    torch.set_num_threads(int(cfg.threads))
    if cfg.loop.budget_ms is None:
        raise ValueError("give the latency budget: loop.budget_ms=<milliseconds>")
    budget = float(cfg.loop.budget_ms)
    if not budget > 0:
        raise ValueError(f"loop.budget_ms must be positive, got {cfg.loop.budget_ms}")
    if cfg.cache.name == "none":
        choice = pick_from_frontier(cfg, pick_device(str(cfg.device)), reuse=False)  # tune.py always measures
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tune.json").write_text(json.dumps(choice, indent=2) + "\n")
        print(f"run it: {run_command(cfg, choice['chosen'])}")
        print(f"results in {out_dir}")
        return choice
    device = pick_device(str(cfg.device))
    checkpoint = resolve_path(cfg.policy.checkpoint)
    policy = load_policy(checkpoint, device, num_inference_steps=cfg.policy.num_inference_steps,
                         scheduler=cfg.policy.scheduler)
    obs = tune_obs(policy, checkpoint, int(cfg.tune.n_obs), str(cfg.env.task))
    rows = measure_budgets(policy, checkpoint, str(cfg.cache.name), list(cfg.tune.n_updates), obs,
                           int(cfg.tune.trials), int(cfg.tune.warmup), int(cfg.cache.get("n_bubble", 5)),
                           str(cfg.cache.get("metric", "cosine")))
    chosen = choose_updates(rows, budget)
    remember(cfg, updates_key(cfg, policy), {"budget_ms": budget, "chosen": chosen, "rows": rows})
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"task": cfg.env.task, "checkpoint": str(cfg.policy.checkpoint), "method": str(cfg.cache.name),
              "budget_ms": budget, "rows": rows, "chosen": chosen, "device": device_name(device),
              "torch_threads": torch.get_num_threads()}
    if chosen["cache"] != "none":
        schedule = make_schedule(policy, checkpoint, chosen["cache"], n_updates=chosen["n_updates"],
                                 n_bubble=int(cfg.cache.get("n_bubble", 5)), metric=str(cfg.cache.get("metric", "cosine")))
        schedule.save(out_dir / "schedule.json")
        result["schedule"] = str(out_dir / "schedule.json")
    (out_dir / "tune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{cfg.env.task}: {policy.config.scheduler}-{policy.config.num_inference_steps}, {device_name(device)}")
    print_tune(rows, chosen, budget)
    if "schedule" in result:
        print(f"run it: python eval/run.py env={cfg.env.name} env.task={cfg.env.task} cache={chosen['cache']} "
              f"cache.schedule={result['schedule']} loop=realtime")
    print(f"results in {out_dir}")
    return result


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    tune(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
