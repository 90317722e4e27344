"""Connect a policy to the cache engine: pick the schedule for a cache method, attach, report FLOPs.

Cache methods (``configs/cache/*.yaml``): ``none`` (no engine), ``uniform`` (all blocks every ⌊K/S⌋
steps), ``unified_acs``, ``blockwise_acs`` and ``bac``. The last three are built from the checkpoint's
calibration file (``eval/calibrate.py`` writes it), or read from an explicit schedule JSON.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bac.calibration import Calibration
from bac.engine import CacheEngine, attach, find_blocks, fingerprint
from bac.schedule import Schedule, uniform

CACHE_METHODS = ("none", "uniform", "unified_acs", "blockwise_acs", "bac")


def calibration_path(checkpoint: str | Path, scheduler: str, num_steps: int) -> Path:
    return Path(checkpoint) / "calibration" / f"{scheduler}_K{num_steps}.npz"


def bench_obs_path(checkpoint: str | Path) -> Path:
    """Held-out observations (key -> (N, To, d)) that eval/calibrate.py saves for eval/bench.py."""
    return Path(checkpoint) / "calibration" / "bench_obs.npz"


def policy_signature(policy) -> tuple[str, int, str]:
    """(scheduler class name, K, model fingerprint): what a schedule must have been made for."""
    return type(policy.noise_scheduler).__name__, policy.config.num_inference_steps, fingerprint(policy.model)


def make_schedule(policy, checkpoint: str | Path, method: str, n_updates: int = 10, n_bubble: int = 5,
                  metric: str = "cosine", schedule_path: str | None = None) -> Schedule | None:
    if method not in CACHE_METHODS:
        raise ValueError(f"unknown cache {method!r}; known caches: {list(CACHE_METHODS)}")
    scheduler, K, model_hash = policy_signature(policy)
    if method == "none":
        return None
    if schedule_path:
        schedule = Schedule.load(schedule_path)
    elif method == "uniform":
        blocks = [info.name for _, _, info in find_blocks(policy.model)]
        schedule = uniform(blocks, K, n_updates, scheduler=scheduler, model_hash=model_hash)
    else:
        path = calibration_path(checkpoint, scheduler, K)
        if not path.exists():
            raise FileNotFoundError(
                f"calibration file {path} is missing; make it with "
                f"`python eval/calibrate.py policy.checkpoint={checkpoint}` (same scheduler and steps)"
            )
        schedule = Calibration.load(path).schedule(method, n_updates, n_bubble, metric)
    schedule.check_compatible(num_steps=K, scheduler=scheduler, model_hash=model_hash)
    return schedule


def enable_cache(policy, schedule: Schedule | None, profile: bool = True) -> CacheEngine:
    """Attach an engine running ``schedule`` to the policy's denoiser (None: compute everything); with
    ``profile``, count its FLOPs once so that ``engine.flops_ratio()`` is available."""
    engine = attach(policy.model, schedule)
    policy.step_cursor = engine
    if not profile:
        return engine
    c, model = policy.config, policy.model
    x = torch.zeros(1, c.horizon, c.action_dim, device=policy.device)
    with torch.no_grad():  # one denoising step as predict_action runs it: condition tokens precomputed
        obs_tokens = model.encode_obs(torch.zeros(1, c.n_obs_steps, c.obs_dim, device=policy.device))
        memory = model.memory(obs_tokens, model.encode_time(torch.zeros(1, dtype=torch.long, device=policy.device)))
    engine.profile_flops(lambda: model(x, 0, memory=memory[0]))
    return engine


def disable_cache(policy, engine: CacheEngine) -> None:
    engine.detach()
    policy.step_cursor = None
