"""Roll out a trained policy and report success with its interval, latency and control frequency.

    python eval/run.py env=robomimic                      # shipped Lift policy, 50 episodes
    python eval/run.py env=robomimic env.task=can eval.n_episodes=100 eval.video=true
    python eval/run.py env=robomimic cache=none -m        # hydra multirun
    python eval/run.py env=robomimic loop=realtime cache=bac   # the world does not wait for the policy
    python eval/run.py env=robomimic loop=realtime cache=bac loop.budget_ms=100   # S chosen for a latency budget

Writes into the run folder: ``config.yaml`` (resolved), ``episodes.jsonl`` (one line per finished
episode, appended as episodes end), ``summary.json`` and, with ``eval.video=true``, ``videos/``.
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
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bac.loop import LoopConfig, simulate  # noqa: E402
from bac.metrics import latency_stats, wilson_interval  # noqa: E402
from bac.rollout import BatchTiming, EpisodeResult  # noqa: E402
from bac.wallclock import Watchdog, run_wallclock  # noqa: E402
from envs import make_env  # noqa: E402
from eval.common import device_name, peak_rss_mb, pick_device, resolve_path, write_atomic  # noqa: E402
from eval.latency import MachineLoad, measure_latency  # noqa: E402
from eval.rollout_setup import (build_cache, check_env_matches_policy, chunk_predictor, latency_model,  # noqa: E402
                                loop_config, pooled_envs, probe_obs, token_reuse)
from eval.rundir import finished_episodes, print_table, run_lock, write_videos  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.vla import VLAPolicy  # noqa: E402
from policies.cache_target import cache_summary, enable_cache  # noqa: E402


def evaluate(cfg: DictConfig, out_dir: Path) -> dict:
    """Roll out ``cfg`` into ``out_dir`` (held by this run alone while it runs) and return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir):
        return _evaluate(cfg, out_dir)


def _evaluate(cfg: DictConfig, out_dir: Path) -> dict:
    if int(cfg.eval.n_episodes) < 1 or int(cfg.eval.n_envs) < 1:
        raise ValueError(f"eval.n_episodes and eval.n_envs must be >= 1, got {cfg.eval.n_episodes} and {cfg.eval.n_envs}")
    if cfg.loop.budget_ms is not None and not float(cfg.loop.budget_ms) > 0:
        raise ValueError(f"loop.budget_ms must be positive, got {cfg.loop.budget_ms}")
    frontier_choice = None
    if cfg.loop.budget_ms is not None and cfg.cache.name == "none":
        # No cache method given: sampler, K and cache are chosen over the task's measured frontier.
        from eval.tune import apply_choice, pick_from_frontier

        torch.set_num_threads(int(cfg.threads))
        frontier_choice = pick_from_frontier(cfg, pick_device(str(cfg.device)))
        cfg = apply_choice(cfg, frontier_choice)
    torch.set_num_threads(int(cfg.threads))
    device = pick_device(str(cfg.device))
    env_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.env, resolve=True).items() if k != "name"}
    probe_env = pooled_envs(cfg.env.name, env_kwargs, 1)[0]  # first: an unknown task is named as such
    checkpoint = resolve_path(cfg.policy.checkpoint)
    policy = load_policy(
        checkpoint, device, num_inference_steps=cfg.policy.num_inference_steps, scheduler=cfg.policy.scheduler,
        n_action_steps=cfg.policy.get("n_action_steps"),
    )
    pc = policy.config
    check_env_matches_policy(probe_env, policy)
    loop, n_chunk = loop_config(cfg, probe_env, policy)
    sample_obs = probe_obs(probe_env, policy, int(cfg.eval.seed))
    cache_name, schedule, budget = build_cache(cfg, policy, checkpoint, sample_obs)
    engine = enable_cache(policy, schedule) if cache_name != "none" else None
    n_episodes, n_envs = int(cfg.eval.n_episodes), max(1, min(int(cfg.eval.n_envs), int(cfg.eval.n_episodes)))
    seeds = [int(cfg.eval.seed) + i for i in range(n_episodes)]
    n_video = int(cfg.eval.n_video) if cfg.eval.video else 0
    out_dir.mkdir(parents=True, exist_ok=True)
    episodes_path = out_dir / "episodes.jsonl"
    finished = finished_episodes(episodes_path, seeds, resume=bool(cfg.eval.get("resume", False)))
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    # Batch-1 latency on this device, measured before the rollouts: the realtime clock's latencies come from it.
    n_lat = max(int(cfg.eval.latency_trials), int(cfg.loop.latency_samples))
    warm = int(cfg.loop.get("warm_start", 0) or 0)
    if warm and cfg.loop.clock == "wall":
        raise ValueError("loop.warm_start runs on the simulated clock; the wall-clock worker keeps no stream memory yet")
    split = {} if isinstance(policy, VLAPolicy) else None  # the VLA's prefix / expert medians, of the same calls
    with MachineLoad() as load:
        latencies = measure_latency(policy, {k: np.repeat(v, 2, 0) for k, v in sample_obs.items()}, n_lat,
                                    int(cfg.eval.seed), warm_start=warm, split=split)
    if load.busy() and device.type == "cpu":
        print(f"note: latency timed while other processes kept {load.other_busy_cores:.2f} of {os.cpu_count()} CPUs busy; "
              "compare it only with latencies timed alike (eval/frontier.py's latency phase times every cell alone)",
              flush=True)
    lat_model = latency_model(cfg, latencies) if loop.mode == "realtime" else None
    reuse = token_reuse(cfg, policy, loop)
    predict = chunk_predictor(policy, n_chunk, int(cfg.eval.seed), warm_start=warm, token_reuse=reuse)

    results, timing = list(finished.values()), BatchTiming()
    if results:
        print(f"resuming {out_dir}: {len(results)} of {n_episodes} episodes already finished", flush=True)
    todo = [s for s in seeds if s not in finished]
    t_start = time.time()
    with open(episodes_path, "a") as jsonl:

        ended = []

        def on_end(r) -> None:
            jsonl.write(json.dumps(r.to_json()) + "\n")
            jsonl.flush()
            ended.append(r.success)
            done, elapsed = len(finished) + len(ended), time.time() - t_start
            print(f"  episode seed {r.seed}: {'success' if r.success else 'failure'} in {r.steps} steps "
                  f"[{done}/{n_episodes}, {sum(x.success for x in finished.values()) + sum(ended)} successes, "
                  f"{elapsed:.0f} s, ETA {elapsed / len(ended) * (n_episodes - done):.0f} s]", flush=True)

        if cfg.loop.clock == "wall":
            results += wallclock_episodes(cfg, env_kwargs, todo, predict, policy, loop, on_end)
        else:
            for first in range(0, len(todo), n_envs):
                batch_seeds = todo[first : first + n_envs]
                record = [seeds.index(s) < n_video for s in batch_seeds]
                plain = iter(pooled_envs(cfg.env.name, env_kwargs, len(record) - sum(record)))
                envs = [make_env(cfg.env.name, **env_kwargs, render_mode="rgb_array") if rec else next(plain)
                        for rec in record]
                try:
                    batch_results = simulate(
                        envs, batch_seeds, predict, pc.n_obs_steps, pc.n_action_steps, int(cfg.env.horizon), loop,
                        lat_model, record_video=record, on_episode_end=on_end, timing=timing,
                    )
                finally:
                    for e, rec in zip(envs, record):
                        if rec:
                            e.close()
                results.extend(batch_results)
                done, elapsed = len(results), time.time() - t_start
                eta = elapsed / (done - len(finished)) * (n_episodes - done)
                print(f"[{done}/{n_episodes}] success so far {sum(r.success for r in results)}/{done}, "
                      f"{elapsed:.0f} s, ETA {eta:.0f} s", flush=True)
                if n_video:
                    write_videos(out_dir, batch_results, record, fps=envs[0].metadata.get("render_fps", 20))

    results.sort(key=lambda r: r.seed)
    lat = latency_stats(latencies)
    env_step = float(np.median(timing.env_step_s)) if timing.env_step_s else 0.0
    n_succ = sum(r.success for r in results)
    lo, hi = wilson_interval(n_succ, n_episodes)
    stats = [r.loop or {} for r in results]
    executed = sum(s.get("executed_actions", 0) for s in stats)
    world_s = sum(r.steps for r in results) / loop.control_hz
    ages = [(s["action_age_ms"], s["executed_actions"]) for s in stats if s.get("action_age_ms") is not None]
    if loop.mode == "offline":
        # One control stream at batch 1: a chunk of Ta actions per inference, the sim waiting for it.
        control_hz = pc.n_action_steps / (lat["p50"] / 1000.0 + pc.n_action_steps * env_step)
    else:  # the world runs at its rate; policy actions per second of world time (holds are not control)
        control_hz = executed / world_s if world_s > 0 else 0.0
    summary = {
        "task": cfg.env.task,
        "env": cfg.env.name,
        "cache": cache_name,
        "cache_config": OmegaConf.to_container(cfg.cache, resolve=True) if budget is None else None,
        "loop": loop.mode,
        "clock": str(cfg.loop.clock),
        "n_episodes": n_episodes,
        "n_successes": n_succ,
        "success_rate": n_succ / n_episodes,
        "success_ci95": [round(lo, 4), round(hi, 4)],
        "latency_ms": {k: round(v, 2) for k, v in lat.items()},
        "inference_hz": round(1000.0 / lat["p50"], 2),
        "latency_split_ms": split,  # the VLA's: prefix (once per chunk) and expert (K steps), medians
        "latency_conditions": load.record(),  # what else ran while latency_ms was timed
        "control_hz": round(control_hz, 2),
        "deadline_misses": sum(s.get("deadline_misses", 0) for s in stats),
        "stale_dropped": sum(s.get("stale_dropped", 0) for s in stats),
        "action_age_ms": round(sum(a * n for a, n in ages) / max(1, sum(n for _, n in ages)), 2) if ages else None,
        "loop_config": {**{k: getattr(loop, k) for k in ("control_hz", "asynchronous", "on_miss", "drop_stale",
                                                           "ensemble", "prefetch_margin")}, "chunk_actions": n_chunk,
                        "latency": str(cfg.loop.latency), "latency_scale": float(cfg.loop.latency_scale),
                        "sim_latency_ms": round(1e3 * lat_model.p95(), 2) if lat_model else None},
        "env_step_ms": round(env_step * 1e3, 2),
        "batched_call_ms": round(1e3 * float(np.median(timing.policy_call_s)), 1) if timing.policy_call_s else None,
        "mean_episode_steps": float(np.mean([r.steps for r in results])),
        "checkpoint": str(cfg.policy.checkpoint),
        "model_hash": policy.cache_target(checkpoint).cache_signature().model_hash,  # a folder can be retrained in place
        "scheduler": pc.scheduler,
        "num_inference_steps": pc.num_inference_steps,
        "n_action_steps": pc.n_action_steps,
        "warm_start": warm,
        "flops_ratio": round(engine.flops_ratio(), 4) if engine else 1.0,
        "cache_stats": engine.stats() | {"schedule": cache_summary(schedule)} if engine else None,
        "budget": budget or frontier_choice,
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": round(time.time() - t_start, 1),
        "peak_rss_mb": peak_rss_mb(),
        "seeds": [seeds[0], seeds[-1]],
        "language": language_stats(results),
        # latency_ms above is without it; eval/vla_reuse.py times it on demo replays
        "token_reuse": {"threshold": reuse.threshold, "max_age": reuse.max_age,
                        "image_tokens_recomputed": round(reuse.recompute_fraction, 4)} if reuse else None,
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_table([summary])
    if summary["language"]:
        lang = dict(summary["language"])
        per_goal = lang.pop("per_goal", {})
        print(f"named goal: {lang}")
        for goal, row in per_goal.items():
            print(f"  {goal}: " + ", ".join(f"{k} {v}" for k, v in row.items() if not k.endswith("_ci95")))
    print(f"results in {out_dir}")
    return summary


def language_stats(results: list[EpisodeResult]) -> dict | None:
    """For scenes whose episodes name a goal (``outcome["goal"]``): how often the named object was handled
    (lifted; where the env reports it) and placed, with its 95% interval, how often another one was, and how often
    only the named one was (the choice made and kept): the evidence that the instruction is used, short of
    success; ``per_goal`` breaks the named rates down by goal. None for other envs."""
    named = [r.outcome for r in results if r.outcome and "goal" in r.outcome]
    if not named:
        return None

    def rates(outcomes: list[dict]) -> dict:
        out = {"n": len(outcomes)}
        for key in ("handled", "placed"):
            if all(key in o for o in outcomes):
                hits = sum(o["goal"] in o[key] for o in outcomes)
                out[f"named_{key}"] = round(hits / len(outcomes), 4)
                out[f"named_{key}_ci95"] = [round(b, 4) for b in wilson_interval(hits, len(outcomes))]
                out[f"other_{key}"] = round(float(np.mean([any(g != o["goal"] for g in o[key]) for o in outcomes])), 4)
                out[f"only_named_{key}"] = round(float(np.mean([set(o[key]) == {o["goal"]} for o in outcomes])), 4)
        return out

    out = rates(named)
    goals = sorted({o["goal"] for o in named})
    if len(goals) > 1:
        out["per_goal"] = {g: rates([o for o in named if o["goal"] == g]) for g in goals}
    return out


def wallclock_episodes(cfg, env_kwargs, seeds, predict, policy, loop: LoopConfig, on_end) -> list[EpisodeResult]:
    """``loop.clock=wall``: one episode at a time on the wall clock, the policy on a worker thread."""
    from envs.sim_robot import SimRobot

    pc = policy.config
    results = []
    for seed in seeds:
        env = make_env(cfg.env.name, **env_kwargs)
        try:
            robot = SimRobot(env, seed, loop.control_hz)
            out = run_wallclock(robot, predict, pc.n_obs_steps, pc.n_action_steps, int(cfg.env.horizon), loop,
                                Watchdog(), latency_scale=float(cfg.loop.latency_scale), should_stop=lambda: robot.done)
        finally:
            env.close()
        if out["stopped"] is not None:
            raise RuntimeError(f"episode seed {seed} was stopped by the watchdog: {out['stopped']}")
        loop_stats = {k: out[k] for k in ("n_inferences", "deadline_misses", "stale_dropped", "executed_actions",
                                          "action_age_ms", "latencies_ms")}
        r = EpisodeResult(seed, robot.success, robot.steps, 0.0, out["n_inferences"], out["elapsed_s"], loop=loop_stats)
        on_end(r)
        results.append(r)
        print(f"[{len(results)}/{len(seeds)}] success so far {sum(x.success for x in results)}/{len(results)}", flush=True)
    return results


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
