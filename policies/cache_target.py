"""DP-T as a cache target (``bac.protocol.CacheTarget``), and attaching a cache to a policy (any policy with a
``cache_target(checkpoint)``: DP-T here, the VLA in ``policies/vla.py``).

The cache methods are built in ``bac.methods`` from what DP-T offers here: its denoiser, its signature (sampler,
K, weights), one denoising step as ``predict_action`` runs it, an uncached run over the calibration observations
that ``eval/calibrate.py`` keeps with the checkpoint, and the calibration file it wrote for this sampler and K.

    cache = make_cache(policy, checkpoint, {"name": "bac", "n_updates": 10})   # configs/cache/<name>.yaml
    engine = enable_cache(policy, cache)       # attach, point the sampler at it, count FLOPs
    ...
    disable_cache(policy, engine)
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from bac.calibration import Calibration
from bac.engine import CacheEngine, fingerprint
from bac.methods import CACHE_METHODS, LITERATURE_METHODS, SCHEDULE_METHODS, build_cache  # noqa: F401
from bac.methods import describe as cache_summary  # noqa: F401
from bac.protocol import Signature, attach_to
from bac.schedule import Schedule


def calibration_path(checkpoint: str | Path, scheduler: str, num_steps: int) -> Path:
    return Path(checkpoint) / "calibration" / f"{scheduler}_K{num_steps}.npz"


def bench_obs_path(checkpoint: str | Path, task: str | None = None) -> Path:
    """Held-out observations (key -> (N, To, d)) for the offline benchmarks: ``bench_obs.npz`` from eval/calibrate.py
    (a single-task checkpoint's demos), or one ``bench_obs_<task>.npz`` per task from eval/record_obs.py, so that a
    checkpoint trained on several tasks is timed and scored on the observations of the task it is asked about."""
    name = f"bench_obs_{task}.npz" if task else "bench_obs.npz"
    return Path(checkpoint) / "calibration" / name


def saved_calibration(checkpoint: str | Path, sig: Signature, remake: str) -> Calibration | None:
    """The calibration eval/calibrate.py saved in ``checkpoint`` for ``sig``'s sampler and K, or None when there is
    none; one made for other weights is refused, with ``remake`` (the command that makes it again)."""
    path = calibration_path(checkpoint, sig.scheduler, sig.num_steps)
    if not path.exists():
        return None
    calib = Calibration.load(path)
    if calib.model_hash != sig.model_hash:
        raise ValueError(f"{path} was calibrated on other weights (model {calib.model_hash}, this one "
                         f"{sig.model_hash}); delete it or recalibrate with `{remake}`")
    return calib


def calib_obs_path(checkpoint: str | Path) -> Path:
    """The observations (key -> (N, To, d)) that eval/calibrate.py calibrated on, kept for the offline fits."""
    return Path(checkpoint) / "calibration" / "calib_obs.npz"


class DPTCacheTarget:
    """``policy`` (a ``DiffusionTransformerPolicy``) from ``checkpoint`` as ``bac.protocol.CacheTarget``; ``obs``
    replaces the checkpoint's calibration observations (eval/calibrate.py, before it saves them)."""

    def __init__(self, policy, checkpoint: str | Path, obs: dict[str, torch.Tensor] | None = None):
        self.policy, self.checkpoint, self.obs = policy, Path(checkpoint), obs

    def cache_model(self) -> torch.nn.Module:
        return self.policy.model

    def cache_signature(self) -> Signature:
        return Signature(type(self.policy.noise_scheduler).__name__, self.policy.config.num_inference_steps,
                         fingerprint(self.policy.model))

    def cache_call(self) -> Callable[[], object]:
        """One denoising step as predict_action runs it: condition tokens precomputed, batch 1, zeros."""
        c, model, device = self.policy.config, self.policy.model, self.policy.device
        x = torch.zeros(1, c.horizon, c.action_dim, device=device)
        with torch.no_grad():
            obs_tokens = model.encode_obs(torch.zeros(1, c.n_obs_steps, c.obs_dim, device=device))
            memory = model.memory(obs_tokens, model.encode_time(torch.zeros(1, dtype=torch.long, device=device)))
        return lambda: model(x, 0, memory=memory[0])

    def calibration_obs(self, n: int) -> dict[str, torch.Tensor]:
        if self.obs is not None:
            return {k: v[:n].to(self.policy.device) for k, v in self.obs.items()}
        path = calib_obs_path(self.checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; make it with `python eval/calibrate.py policy.checkpoint="
                                    f"{self.checkpoint}` (the fitted cache methods fit on the calibration observations)")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in self.policy.config.obs_keys if k not in z.files]
            if missing:
                raise ValueError(f"{path} lacks observation keys {missing}; re-run eval/calibrate.py")
            return {k: torch.from_numpy(z[k][:n]).to(self.policy.device) for k in self.policy.config.obs_keys}

    def cache_sample(self, cursor, n: int, seed: int) -> torch.Tensor:
        """One sampling run over n calibration observations; returns the predicted trajectory (n, T, Da)."""
        policy = self.policy
        obs = self.calibration_obs(n)
        policy.step_cursor = cursor
        try:
            out = policy.predict_action(obs, generator=torch.Generator(device=policy.device).manual_seed(seed))
        finally:
            policy.step_cursor = None
        return out["action_pred"]

    def cache_calibration(self) -> Calibration:
        sig = self.cache_signature()
        remake = f"python eval/calibrate.py policy.checkpoint={self.checkpoint}"
        calib = saved_calibration(self.checkpoint, sig, remake)
        if calib is None:
            raise FileNotFoundError(f"calibration file {calibration_path(self.checkpoint, sig.scheduler, sig.num_steps)} "
                                    f"is missing; make it with `{remake}` (same scheduler and steps)")
        return calib


def policy_signature(policy) -> tuple[str, int, str]:
    """(scheduler class name, K, model fingerprint): what a schedule must have been made for."""
    sig = policy.cache_target(".").cache_signature()
    return sig.scheduler, sig.num_steps, sig.model_hash


def make_cache(policy, checkpoint: str | Path, cfg):
    """The schedule or strategy of the cache config ``cfg`` (a mapping with ``name`` and the method's knobs, e.g.
    ``configs/cache/teacache.yaml``) for ``policy``; None for ``none`` (see ``bac.methods``)."""
    return build_cache(policy.cache_target(checkpoint), cfg)


def make_schedule(policy, checkpoint: str | Path, method: str, n_updates: int = 10, n_bubble: int = 5,
                  metric: str = "cosine", schedule_path: str | None = None) -> Schedule | None:
    """A BAC ablation row's schedule (``bac.methods.rows``); None for ``none``."""
    if method not in SCHEDULE_METHODS:
        raise ValueError(f"unknown cache {method!r}; known caches: {list(CACHE_METHODS)}"
                         + (" (build it with make_cache)" if method in CACHE_METHODS else ""))
    return make_cache(policy, checkpoint, {"name": method, "n_updates": n_updates, "n_bubble": n_bubble,
                                           "metric": metric, "schedule": schedule_path})


def enable_cache(policy, schedule, profile: bool = True) -> CacheEngine:
    """Attach an engine running ``schedule`` (a Schedule, a Strategy or None: compute everything) to the
    policy's denoiser; with ``profile``, count its FLOPs once so that ``engine.flops_ratio()`` is available."""
    engine = attach_to(policy.cache_target("."), schedule, profile=profile)
    policy.step_cursor = engine
    return engine


def disable_cache(policy, engine: CacheEngine) -> None:
    engine.detach()
    policy.step_cursor = None
