"""Run a policy on a robot on the wall clock, with a watchdog: the deployment loop.

    python eval/deploy.py env=robomimic cache=bac                      # the simulated robot, Lift
    python eval/deploy.py env=robomimic env.task=can cache=bac loop.budget_ms=100 deploy.max_steps=400
    python eval/deploy.py env=robomimic cache=bac deploy.fault=nan        # the stop path, on purpose

The control thread ticks at the robot's control rate; the policy runs on a worker thread (asynchronously by
default: the next chunk is computed while the current one executes). The watchdog stops the robot safely after
``deploy.max_consecutive_misses`` missed deadlines in a row, on an inference slower than
``deploy.inference_deadline_ms`` (the first one included), on a NaN or inf observation, or on any exception;
Ctrl-C stops it too. Every action passes the safety layer first (``bac.safety``): its shape and finiteness are
checked (a bad one stops the robot), it is clipped to the robot's bounds and, with ``deploy.max_rate`` /
``deploy.max_jerk``, limited in its change per tick; a stop for a fault sends the robot's declared safe action.
``deploy.fault=nan|wrong_size|hang|send_error`` injects a fault to exercise that path; the summary's ``safety``
says what fired. Every tick is appended to ``deploy.jsonl`` in the run folder (flushed as it goes), the
summary to ``summary.json``. ``deploy.robot=sim`` is the simulator-backed robot (``envs/sim_robot.py``); a real
robot implements the same four methods (``bac.wallclock.Robot``).
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

from bac.wallclock import Watchdog, run_wallclock  # noqa: E402
from bac.safety import ActionLimits, SafetyGuard  # noqa: E402
from envs import make_env  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.cache_target import cache_summary, enable_cache  # noqa: E402

ROBOTS = ("sim",)
FAULTS = (None, "nan", "wrong_size", "hang", "send_error")


def inject(fault: str | None, at: int, predict, robot):
    """``predict`` and ``robot`` with ``fault`` injected at policy call (or tick) ``at``: the deploy-time test."""
    fault = None if fault is None else str(fault)  # hydra reads deploy.fault=nan as a float NaN
    if fault not in FAULTS:
        raise ValueError(f"deploy.fault must be one of {list(FAULTS)}, got {fault!r}")
    if fault is None:
        return predict
    if fault == "send_error":
        send = robot.send_action

        def failing_send(action):  # one failed send, as a dropped link would give
            if robot.steps == at and not getattr(robot, "_fault_fired", False):
                robot._fault_fired = True
                raise ConnectionError(f"injected fault: the robot link failed at tick {at}")
            send(action)

        robot.send_action = failing_send
        return predict
    calls = []

    def faulty(obs):
        calls.append(1)
        chunk = predict(obs)
        if len(calls) >= at:
            if fault == "nan":
                chunk = np.full_like(chunk, np.nan)
            elif fault == "wrong_size":
                chunk = np.zeros((*chunk.shape[:-1], chunk.shape[-1] - 1), chunk.dtype)
            elif fault == "hang":
                import time

                time.sleep(3600)
        return chunk

    return faulty


def deploy(cfg: DictConfig, out_dir: Path) -> dict:
    from eval.common import device_name, pick_device, resolve_path
    from eval.rollout_setup import build_cache, check_env_matches_policy, chunk_predictor, loop_config, probe_obs

    torch.set_num_threads(int(cfg.threads))
    if cfg.deploy.robot not in ROBOTS:
        raise ValueError(f"deploy.robot must be one of {ROBOTS}, got {cfg.deploy.robot!r}")
    device = pick_device(str(cfg.device))
    checkpoint = resolve_path(cfg.policy.checkpoint)
    policy = load_policy(checkpoint, device, num_inference_steps=cfg.policy.num_inference_steps,
                         scheduler=cfg.policy.scheduler, n_action_steps=cfg.policy.get("n_action_steps"))
    pc = policy.config
    env_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.env, resolve=True).items() if k != "name"}
    env = make_env(cfg.env.name, **env_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        check_env_matches_policy(env, policy)
        loop, n_chunk = loop_config(cfg, env, policy)
        if loop.mode != "realtime":
            raise ValueError("deployment runs on the wall clock: use loop=realtime")
        cache_name, schedule, _ = build_cache(cfg, policy, checkpoint, probe_obs(env, policy, int(cfg.deploy.seed)))
        if cache_name != "none":
            enable_cache(policy, schedule, profile=False)
        predict = chunk_predictor(policy, n_chunk, int(cfg.deploy.seed))
        from envs.sim_robot import SimRobot

        robot = SimRobot(env, int(cfg.deploy.seed), loop.control_hz)
        space = env.action_space
        guard = SafetyGuard(ActionLimits(low=space.low, high=space.high, safe_action=robot.safe_action(),
                                         max_rate=cfg.deploy.get("max_rate"), max_jerk=cfg.deploy.get("max_jerk")))
        predict = inject(cfg.deploy.get("fault"), int(cfg.deploy.get("fault_at", 3)), predict, robot)
        deadline_ms = cfg.deploy.get("inference_deadline_ms")
        with open(out_dir / "deploy.jsonl", "a") as f:

            def log(record: dict) -> None:
                f.write(json.dumps(record) + "\n")
                f.flush()

            summary = run_wallclock(
                robot, predict, pc.n_obs_steps, pc.n_action_steps, int(cfg.deploy.max_steps), loop,
                Watchdog(max_consecutive_misses=int(cfg.deploy.max_consecutive_misses),
                         inference_deadline_s=None if deadline_ms is None else float(deadline_ms) / 1e3), log=log,
                latency_scale=float(cfg.loop.latency_scale), should_stop=lambda: robot.done, guard=guard,
            )
    finally:
        env.close()
    summary = {"task": cfg.env.task, "cache": cache_name, "schedule": cache_summary(schedule),
               "robot": str(cfg.deploy.robot), "success": robot.success, **summary,
               "latency_ms": {k: round(float(np.percentile(summary["latencies_ms"], q)), 2)
                              for k, q in (("p50", 50), ("p95", 95), ("p99", 99))} if summary["latencies_ms"] else None,
               "device": device_name(device)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lat = summary["latency_ms"] or {}
    print(f"{summary['task']} {cache_name}: {'success' if robot.success else 'no success'} after {summary['ticks']} ticks "
          f"({summary['elapsed_s']:.1f} s); control {summary['control_hz']} Hz; latency p50 {lat.get('p50')} ms, "
          f"p95 {lat.get('p95')} ms; misses {summary['deadline_misses']}, stale dropped {summary['stale_dropped']}; "
          f"stopped: {summary['stopped'] or 'no (finished)'}")
    print(f"safety: {summary['safety']}" + (f"; stop errors: {summary['stop_errors']}" if summary["stop_errors"] else ""))
    print(f"log in {out_dir / 'deploy.jsonl'}")
    return summary


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="deploy")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    deploy(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
