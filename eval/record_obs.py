"""Record held-out observations in closed loop, for the offline benchmarks of a checkpoint that ships without demos.

    python eval/record_obs.py env=robomimic_lang policy=vla policy.checkpoint=checkpoints/vla_lift_reuse

Rolls the uncached policy out from seeds far from any evaluation's (``record.seed``, default 100000 on), keeps the
observation history of every replanning point, and saves ``record.n_obs`` of them drawn evenly over the recorded
points to ``<checkpoint>/calibration/bench_obs_<task>.npz`` (key -> (N, To, ...), the instruction as text), where
eval/frontier.py, eval/bench.py and eval/tune.py read the held-out observations of the task they run on (one file
per task, so a multi-task checkpoint is timed and scored on each scene's own images). A sidecar
``bench_obs_<task>.json`` says where they came from (task, seeds, the episodes' outcome, the replanning call each
kept observation was made at).

eval/calibrate.py draws DP-T's held-out observations from its training demos; a VLA's demos (camera images) are too
large to ship, and observations the policy meets in its own rollouts are the ones its latency and action error
matter on. An existing file is kept unless ``record.overwrite=true``.
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
from eval.common import pick_device, resolve_path, write_atomic  # noqa: E402
from eval.rollout_setup import check_env_matches_policy, chunk_predictor, pooled_envs  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.cache_target import bench_obs_path  # noqa: E402


def pick_evenly(n_have: int, n: int) -> list[int]:
    """``n`` indices spread evenly over ``range(n_have)`` (all of them when there are no more)."""
    if n_have <= n:
        return list(range(n_have))
    return sorted({int(round(x)) for x in np.linspace(0, n_have - 1, n)})


def record(cfg: DictConfig) -> Path:
    rc = cfg.record
    n_obs, n_episodes = int(rc.n_obs), int(rc.n_episodes)
    if n_obs < 1 or n_episodes < 1:
        raise ValueError(f"record.n_obs and record.n_episodes must be >= 1, got {n_obs} and {n_episodes}")
    checkpoint = resolve_path(cfg.policy.checkpoint)
    task = cfg.env.get("task")
    out = Path(str(rc.out)) if rc.out else bench_obs_path(checkpoint, str(task) if task else None)
    if out.exists() and not bool(rc.overwrite):
        raise FileExistsError(f"{out} exists; record.overwrite=true replaces it (the observations it holds are what "
                              "earlier benchmarks of this checkpoint measured on)")
    torch.set_num_threads(int(cfg.threads))
    device = pick_device(str(cfg.device))
    policy = load_policy(checkpoint, device, num_inference_steps=cfg.policy.num_inference_steps,
                         scheduler=cfg.policy.scheduler, n_action_steps=cfg.policy.get("n_action_steps"))
    pc = policy.config
    env_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.env, resolve=True).items() if k != "name"}
    seeds = [int(rc.seed) + i for i in range(n_episodes)]
    envs = pooled_envs(cfg.env.name, env_kwargs, n_episodes)
    check_env_matches_policy(envs[0], policy)
    predict = chunk_predictor(policy, pc.n_action_steps, int(rc.seed))
    seen: list[dict] = []  # each replanning call's batch, in call order

    def recording(batch: dict[str, np.ndarray]) -> np.ndarray:
        seen.append({k: np.array(v) for k, v in batch.items()})
        return predict(batch)

    t0 = time.time()
    results = simulate(envs, seeds, recording, pc.n_obs_steps, pc.n_action_steps, int(cfg.env.horizon),
                       LoopConfig(mode="offline"))
    rows = [(call, i, batch) for call, batch in enumerate(seen) for i in range(next(iter(batch.values())).shape[0])]
    if not rows:
        raise RuntimeError("the rollouts made no replanning call; nothing to record")
    keep = [rows[j] for j in pick_evenly(len(rows), n_obs)]
    arrays = {k: np.stack([batch[k][i] for _, i, batch in keep]) for k in keep[0][2]}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(out)
    meta = {"command": "python eval/record_obs.py " + " ".join(sys.argv[1:]), "checkpoint": str(cfg.policy.checkpoint),
            "task": str(task or cfg.env.name), "seeds": [seeds[0], seeds[-1]],
            "successes": [bool(r.success) for r in results], "episode_steps": [int(r.steps) for r in results],
            "replanning_points": len(rows), "kept": len(keep), "kept_calls": [call for call, _, _ in keep],
            "keys": {k: list(v.shape) for k, v in arrays.items()}, "wall_s": round(time.time() - t0, 1),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    write_atomic(out.with_suffix(".json"), json.dumps(meta, indent=2) + "\n")
    print(f"kept {len(keep)} of {len(rows)} replanning observations from {n_episodes} episodes "
          f"({sum(meta['successes'])} successes) -> {out}", flush=True)
    return out


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    record(cfg)


if __name__ == "__main__":
    main()
