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
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from bac.engine import fingerprint  # noqa: E402
from bac.metrics import latency_stats, wilson_interval  # noqa: E402
from bac.loop import LatencyModel, LoopConfig, Watchdog, run_wallclock, simulate  # noqa: E402
from bac.rollout import BatchTiming, EpisodeResult, ObsHistory  # noqa: E402
from bac.warmstart import WarmStart  # noqa: E402
from envs import make_env  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.caching import cache_summary, enable_cache, make_cache, make_schedule  # noqa: E402


def resolve_path(p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() or path.exists() else ROOT / path


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but torch sees no CUDA device")
    return torch.device(name)


def check_env_matches_policy(env, policy) -> None:
    env_keys = set(env.observation_space.spaces)
    missing = [k for k in policy.config.obs_keys if k not in env_keys]
    if missing:
        raise KeyError(f"the env does not provide observation keys {missing} that the policy needs; it has {sorted(env_keys)}")
    for key, dim in zip(policy.config.obs_keys, policy.config.obs_dims):
        shape = env.observation_space[key].shape
        if int(np.prod(shape)) != dim:
            raise ValueError(f"env observation {key!r} has shape {shape}; the policy was trained with dimension {dim}")
    if env.action_space.shape[-1] != policy.config.action_dim:
        raise ValueError(f"env action dim {env.action_space.shape[-1]} != policy action dim {policy.config.action_dim}")


def measure_latency(policy, sample_obs: dict[str, np.ndarray], trials: int, seed: int, warm_start: int = 0) -> list[float]:
    """Time batch-1 ``predict_action`` on observations seen in the rollout (2 warm-up calls excluded); with
    ``warm_start`` = k0, the warm-started call (its guess: a cold prediction for the same observation)."""
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    n = next(iter(sample_obs.values())).shape[0]
    times = []
    for i in range(trials + 2):
        obs = {k: torch.from_numpy(v[i % n : i % n + 1]) for k, v in sample_obs.items()}
        init = policy.predict_action(obs, generator=gen)["action_pred"] if warm_start else None
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        policy.predict_action(obs, generator=gen, init_action=init, init_step=warm_start)
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times


def loop_config(cfg: DictConfig, env, policy) -> tuple[LoopConfig, int]:
    """The LoopConfig of ``cfg.loop`` and how many actions of each chunk go to the queue."""
    lc, pc = cfg.loop, policy.config
    hz = float(lc.control_hz or env.metadata.get("render_fps", 20))
    max_chunk = pc.horizon - pc.n_obs_steps + 1
    n_chunk = int(lc.chunk_actions or pc.n_action_steps)
    if not pc.n_action_steps <= n_chunk <= max_chunk:
        raise ValueError(f"loop.chunk_actions={n_chunk} must be in [n_action_steps={pc.n_action_steps}, "
                         f"horizon - n_obs_steps + 1 = {max_chunk}]")
    if lc.clock not in ("simulated", "wall"):
        raise ValueError(f"loop.clock must be simulated or wall, got {lc.clock!r}")
    config = LoopConfig(mode=str(lc.name), control_hz=hz, asynchronous=bool(lc.asynchronous), on_miss=str(lc.on_miss),
                        drop_stale=bool(lc.drop_stale), ensemble=None if lc.ensemble is None else float(lc.ensemble),
                        prefetch_margin=int(lc.prefetch_margin))
    return config, n_chunk


def build_cache(cfg: DictConfig, policy, checkpoint: Path, sample_obs) -> tuple[str, object, dict | None]:
    """(cache name, schedule or strategy or None, the budget pick or None) for ``cfg.cache``; with
    ``loop.budget_ms`` the tuner picks a schedule method and S for the latency budget instead."""
    if cfg.loop.budget_ms is None:  # the cache config as given: a schedule, a strategy (bac.strategies) or None
        return str(cfg.cache.name), make_cache(policy, checkpoint, OmegaConf.to_container(cfg.cache, resolve=True)), None
    from eval.tune import pick_budget

    budget = pick_budget(cfg, policy, checkpoint, sample_obs)
    name, n_updates = budget["chosen"]["cache"], int(budget["chosen"]["n_updates"])
    schedule = make_schedule(policy, checkpoint, name, n_updates=n_updates, n_bubble=int(cfg.cache.get("n_bubble", 0)),
                             metric=str(cfg.cache.get("metric", "cosine")))
    return name, schedule, budget


def chunk_predictor(policy, n_chunk: int, seed: int, warm_start: int = 0):
    """``predict(obs numpy) -> (B, n_chunk, Da)``: the predicted actions from the current observation's step on.
    With ``warm_start`` = k0 > 0, each stream's chunk starts from its previous one at step k0 (bac.warmstart)."""
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    start = policy.config.n_obs_steps - 1
    if warm_start:
        if not 0 < warm_start < policy.config.num_inference_steps:
            raise ValueError(f"loop.warm_start must be in [0, num_inference_steps={policy.config.num_inference_steps}),"
                             f" got {warm_start}")

        def sample(batch: dict[str, np.ndarray], init: np.ndarray | None, k0: int) -> np.ndarray:
            obs = {k: torch.from_numpy(v) for k, v in batch.items()}
            init_t = None if init is None else torch.from_numpy(init)
            return policy.predict_action(obs, generator=gen, init_action=init_t, init_step=k0)["action_pred"].cpu().numpy()

        return WarmStart(sample, policy.config.n_obs_steps, n_chunk, int(warm_start))

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        obs = {k: torch.from_numpy(v) for k, v in batch.items()}
        return policy.predict_action(obs, generator=gen)["action_pred"][:, start : start + n_chunk].cpu().numpy()

    return predict


def latency_model(cfg: DictConfig, measured_s: list[float]) -> LatencyModel:
    lc = cfg.loop
    scale = float(lc.latency_scale)
    if lc.latency == "fixed":
        if lc.latency_ms is None:
            raise ValueError("loop.latency=fixed needs loop.latency_ms=<milliseconds>")
        return LatencyModel(fixed_s=float(lc.latency_ms) / 1e3, scale=scale)
    if lc.latency == "median":
        return LatencyModel(fixed_s=float(np.median(measured_s)), scale=scale)
    if lc.latency == "sampled":
        return LatencyModel(samples_s=measured_s, scale=scale, seed=int(cfg.eval.seed))
    raise ValueError(f"loop.latency must be median, sampled or fixed, got {lc.latency!r}")


def probe_obs(env, policy, seed: int) -> dict[str, np.ndarray]:
    """A batch-1 observation history from a reset (for latency timing and the budget tuner)."""
    h = ObsHistory(policy.config.n_obs_steps)
    obs, _ = env.reset(seed=seed)
    h.reset(obs)
    return {k: v[None] for k, v in h.stacked().items()}


def evaluate(cfg: DictConfig, out_dir: Path) -> dict:
    """Roll out ``cfg`` into ``out_dir`` (held by this run alone while it runs) and return the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_lock(out_dir):
        return _evaluate(cfg, out_dir)


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
    latencies = measure_latency(policy, {k: np.repeat(v, 2, 0) for k, v in sample_obs.items()}, n_lat, int(cfg.eval.seed),
                                warm_start=warm)
    lat_model = latency_model(cfg, latencies) if loop.mode == "realtime" else None
    predict = chunk_predictor(policy, n_chunk, int(cfg.eval.seed), warm_start=warm)

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
        "model_hash": fingerprint(policy.model),  # which weights: a checkpoint folder can be retrained in place
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
    }
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    print_table([summary])
    print(f"results in {out_dir}")
    return summary


_ENV_POOL: dict[tuple, list] = {}


def pooled_envs(name: str, kwargs: dict, n: int) -> list:
    """``n`` envs of one kind, kept for the rest of the process: building a robosuite env takes ~1.5 s and its
    first reset ~0.9 s, as long as a whole cached rollout batch, while a seeded reset of a used env gives the same
    episode bit for bit (``tests/test_robomimic_env.py``). Closed at exit."""
    key = (name, json.dumps(kwargs, sort_keys=True))
    if not _ENV_POOL:
        import atexit

        atexit.register(lambda: [e.close() for pool in _ENV_POOL.values() for e in pool])
    pool = _ENV_POOL.setdefault(key, [])
    while len(pool) < n:
        pool.append(make_env(name, **kwargs))
    return pool[:n]


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


def peak_rss_mb() -> float:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it over ``path``: a crash or a full disk
    leaves the previous file (or none), never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def device_name(device: torch.device) -> str:
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


def print_columns(lines: list[list[str]]) -> None:
    """Print rows of strings as aligned columns; the first row is the header."""
    widths = [max(len(r[i]) for r in lines) for i in range(len(lines[0]))]
    for j, r in enumerate(lines):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    evaluate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
