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
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from bac.metrics import latency_stats  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.caching import disable_cache, enable_cache, make_schedule  # noqa: E402


def measure_budgets(policy, checkpoint: Path, method: str, budgets: list[int], obs: list[dict], trials: int,
                    warmup: int = 2, n_bubble: int = 5, metric: str = "cosine") -> list[dict]:
    """Batch-1 latency of the uncached policy and of ``method`` at each S in ``budgets``, interleaved rounds.

    Returns one row per config: ``n_updates`` (K for the uncached one), ``cache``, ``latency_ms`` (p50/p95/p99),
    ``hz`` (1000 / p95: the chunk rate the device sustains), ``flops_ratio``.
    """
    K = policy.config.num_inference_steps
    configs = [("none", K, None)]
    for S in sorted({int(s) for s in budgets}):
        if not 1 <= S <= K:
            raise ValueError(f"tune.n_updates holds S={S}; every S must be in [1, {K}] (the policy's step count)")
        if S < K:
            configs.append((method, S, make_schedule(policy, checkpoint, method, n_updates=S, n_bubble=n_bubble,
                                                     metric=metric)))
    flops = {}
    times: dict[int, list[float]] = {S: [] for _, S, _ in configs}
    device = policy.device
    for r in range(warmup + trials):
        for name, S, schedule in configs:
            engine = enable_cache(policy, schedule, profile=(r == 0)) if schedule is not None else None
            if engine is not None and r == 0:
                flops[S] = engine.flops_ratio()
            gen = torch.Generator(device=device).manual_seed(r)
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            policy.predict_action(obs[r % len(obs)], generator=gen)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if r >= warmup:
                times[S].append(time.perf_counter() - t0)
            if engine is not None:
                disable_cache(policy, engine)
    rows = []
    for name, S, _ in configs:
        lat = {k: round(v, 2) for k, v in latency_stats(times[S]).items()}
        rows.append({"cache": name, "n_updates": S, "latency_ms": lat, "hz": round(1000.0 / lat["p95"], 2),
                     "flops_ratio": round(flops.get(S, 1.0), 4)})
    return rows


def choose(rows: list[dict], budget_ms: float) -> dict:
    """The row with the most computed steps whose p95 meets ``budget_ms``; if none does, the fastest row with
    ``meets_budget`` False (so the caller can say so)."""
    if not budget_ms > 0:
        raise ValueError(f"the latency budget must be positive, got {budget_ms} ms")
    ok = [r for r in rows if r["latency_ms"]["p95"] <= budget_ms]
    if ok:
        return dict(max(ok, key=lambda r: r["n_updates"]), meets_budget=True)
    return dict(min(rows, key=lambda r: r["latency_ms"]["p95"]), meets_budget=False)


def pick_budget(cfg, policy, checkpoint: Path, obs: dict) -> dict:
    """``loop.budget_ms`` in eval/run.py and eval/deploy.py: time ``cfg.cache.name`` at ``cfg.tune.n_updates`` on the
    batch-1 observation ``obs`` (key -> (1, To, d) numpy), print the table, return {budget_ms, chosen, rows}."""
    if cfg.cache.name == "none":
        raise ValueError("loop.budget_ms picks a cache budget S; choose a cache method too, e.g. cache=bac")
    one = [{k: torch.from_numpy(v).to(policy.device) for k, v in obs.items()}]
    rows = measure_budgets(policy, checkpoint, str(cfg.cache.name), list(cfg.tune.n_updates), one, int(cfg.tune.trials),
                           int(cfg.tune.warmup), int(cfg.cache.get("n_bubble", 5)), str(cfg.cache.get("metric", "cosine")))
    chosen = choose(rows, float(cfg.loop.budget_ms))
    print_tune(rows, chosen, float(cfg.loop.budget_ms))
    return {"budget_ms": float(cfg.loop.budget_ms), "chosen": chosen, "rows": rows}


def tune_obs(policy, checkpoint: Path, n: int) -> list[dict]:
    from eval.bench import load_bench_obs

    obs = load_bench_obs(policy, checkpoint, n)
    m = next(iter(obs.values())).shape[0]
    return [{k: v[i : i + 1].to(policy.device) for k, v in obs.items()} for i in range(m)]


def print_tune(rows: list[dict], chosen: dict, budget_ms: float) -> None:
    from eval.run import print_columns

    lines = [["cache", "S", "p50 ms", "p95 ms", "Hz (1/p95)", "FLOPs ratio", "meets budget"]]
    for r in rows:
        lines.append([r["cache"], str(r["n_updates"]), f"{r['latency_ms']['p50']:.1f}", f"{r['latency_ms']['p95']:.1f}",
                      f"{r['hz']:.1f}", f"{r['flops_ratio']:.3f}", "yes" if r["latency_ms"]["p95"] <= budget_ms else "no"])
    print_columns(lines)
    verdict = "meets" if chosen["meets_budget"] else "does NOT meet (no config does; this is the fastest)"
    print(f"budget {budget_ms:g} ms: chose {chosen['cache']} S={chosen['n_updates']} "
          f"(p95 {chosen['latency_ms']['p95']:.1f} ms), which {verdict} the budget")


def frontier_path(cfg) -> Path:
    from eval.run import resolve_path

    given = cfg.tune.get("frontier")
    return resolve_path(str(given)) if given else ROOT / "docs" / "frontier" / str(cfg.env.task) / "frontier.json"


def pick_from_frontier(cfg, device) -> dict:
    """Sampler, K and cache for ``loop.budget_ms`` over the task's measured frontier, with the p95 latencies
    measured again on ``device``: {budget_ms, frontier, chosen, meets_budget, rows}."""
    from bac.frontier import choose_for_budget
    from eval.frontier import cell_of, measure
    from eval.run import resolve_path

    budget = float(cfg.loop.budget_ms)
    path = frontier_path(cfg)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: measure the frontier first (`python eval/frontier.py "
                                f"env={cfg.env.name} env.task={cfg.env.task}`), or tune one method's S with cache=<method>")
    data = json.loads(path.read_text())
    rows = [r for r in data["rows"] if "success" in r and "latency_ms" in r]
    if not rows:
        raise ValueError(f"{path} has no cell with both rollouts and latency yet; run eval/frontier.py to the end")
    candidates = [r for r in rows if r["latency_ms"]["p95"] <= 2 * budget] or [min(rows, key=lambda r: r["latency_ms"]["p95"])]
    timed = measure([cell_of(r) for r in candidates], resolve_path(cfg.policy.checkpoint), device, int(cfg.tune.trials),
                    int(cfg.tune.warmup), int(cfg.tune.n_obs), proxies=False)
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
    return {"budget_ms": budget, "frontier": str(path), "chosen": chosen, "meets_budget": pick["meets_budget"],
            "rows": table}


def apply_choice(cfg, choice: dict):
    """``cfg`` with the frontier choice's sampler, K and cache (and no budget left to pick)."""
    from omegaconf import OmegaConf

    from eval.bench import method_defaults

    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    c = choice["chosen"]
    out.policy.scheduler, out.policy.num_inference_steps = c["sampler"], c["num_inference_steps"]
    name = c["cache"]["name"]
    out.cache = OmegaConf.create({**(method_defaults(name) if name != "none" else {"name": "none"}), **c["cache"]})
    out.loop.budget_ms, out.loop.warm_start = None, c.get("warm_start", 0)
    return out


def print_frontier_choice(rows: list[dict], chosen: dict, meets: bool, budget_ms: float, path: Path) -> None:
    from eval.run import print_columns

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
    from eval.run import device_name, pick_device, resolve_path

    torch.set_num_threads(int(cfg.threads))
    if cfg.loop.budget_ms is None:
        raise ValueError("give the latency budget: loop.budget_ms=<milliseconds>")
    budget = float(cfg.loop.budget_ms)
    if not budget > 0:
        raise ValueError(f"loop.budget_ms must be positive, got {cfg.loop.budget_ms}")
    if cfg.cache.name == "none":
        choice = pick_from_frontier(cfg, pick_device(str(cfg.device)))
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "tune.json").write_text(json.dumps(choice, indent=2) + "\n")
        print(f"run it: {run_command(cfg, choice['chosen'])}")
        print(f"results in {out_dir}")
        return choice
    device = pick_device(str(cfg.device))
    checkpoint = resolve_path(cfg.policy.checkpoint)
    policy = load_policy(checkpoint, device, num_inference_steps=cfg.policy.num_inference_steps,
                         scheduler=cfg.policy.scheduler)
    obs = tune_obs(policy, checkpoint, int(cfg.tune.n_obs))
    rows = measure_budgets(policy, checkpoint, str(cfg.cache.name), list(cfg.tune.n_updates), obs,
                           int(cfg.tune.trials), int(cfg.tune.warmup), int(cfg.cache.get("n_bubble", 5)),
                           str(cfg.cache.get("metric", "cosine")))
    chosen = choose(rows, budget)
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
