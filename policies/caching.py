"""Connect a policy to the cache engine: build the schedule or strategy of a cache method, attach, report FLOPs.

Cache methods (``configs/cache/*.yaml``, one file each with its knobs):
  BAC's ablation rows   ``none`` (no engine), ``uniform`` (all blocks every ⌊K/S⌋ steps), ``unified_acs``,
                        ``blockwise_acs``, ``bac``: schedules from the checkpoint's calibration file
                        (``eval/calibrate.py`` writes it) or an explicit schedule JSON
  the literature        ``fora``, ``delta_dit``, ``profiling`` (static masks), ``ertacache``, ``taylorseer``,
                        ``foca``, ``abcache``, ``hyca``, ``bac_forecast`` (masks + forecasters), ``teacache``,
                        ``fbcache``, ``bwcache`` (online triggers), ``toca`` (token-wise); see ``bac.strategies``
Methods with an offline fit (teacache, hyca, ertacache) fit it on an uncached run over the calibration
observations that ``eval/calibrate.py`` saved with the checkpoint (``calibration/calib_obs.npz``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from bac.calibration import Calibration
from bac.engine import CacheEngine, attach, find_blocks, fingerprint
from bac.schedule import Schedule, uniform
from bac.strategies import Strategy

SCHEDULE_METHODS = ("none", "uniform", "unified_acs", "blockwise_acs", "bac")
LITERATURE_METHODS = ("fora", "delta_dit", "profiling", "ertacache", "teacache", "fbcache", "bwcache", "toca",
                      "taylorseer", "foca", "abcache", "hyca", "bac_forecast")
CACHE_METHODS = SCHEDULE_METHODS + LITERATURE_METHODS


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
    if method not in SCHEDULE_METHODS:
        raise ValueError(f"unknown cache {method!r}; known caches: {list(CACHE_METHODS)}"
                         + (" (build it with make_cache)" if method in CACHE_METHODS else ""))
    scheduler, K, model_hash = policy_signature(policy)
    if method == "none":
        return None
    if schedule_path:
        schedule = Schedule.load(schedule_path)
        if schedule.method != method:  # a BAC schedule run as cache=uniform would be labelled uniform
            raise ValueError(f"cache.schedule={schedule_path} holds a {schedule.method!r} schedule, but cache={method}; "
                             f"run it as cache={schedule.method}")
    elif not (isinstance(n_updates, int) and 1 <= n_updates <= K):
        raise ValueError(f"cache.n_updates={n_updates!r} must be an integer in [1, K={K}] (update steps per block "
                         f"out of the sampler's {K})")
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


def calib_obs_path(checkpoint: str | Path) -> Path:
    """The observations (key -> (N, To, d)) that eval/calibrate.py calibrated on, kept for the offline fits."""
    return Path(checkpoint) / "calibration" / "calib_obs.npz"


def record_trajectory(policy, obs: dict[str, torch.Tensor], seed: int = 0) -> tuple[list, dict, np.ndarray]:
    """One uncached sampling run on ``obs`` with every block recorded: (blocks, {name: (K, N, T, C)},
    first block input (K, N, T, C)), as float32 numpy."""
    from bac.engine import FIRST_INPUT

    engine = attach(policy.model)  # no schedule: every block computes, and recording keeps each output
    policy.step_cursor = engine
    try:
        with engine.recording(first_input=True) as rec:
            policy.predict_action(obs, generator=torch.Generator(device=policy.device).manual_seed(seed))
    finally:
        engine.detach()
        policy.step_cursor = None
    first = torch.stack(rec.pop(FIRST_INPUT)).numpy()
    return engine.blocks, {name: torch.stack(outs).numpy() for name, outs in rec.items()}, first


_TRAJECTORIES: dict = {}


def calibration_trajectory(policy, checkpoint: str | Path, n_obs: int = 8) -> tuple[list, dict, np.ndarray]:
    """``record_trajectory`` on the checkpoint's calibration observations (kept in memory per policy)."""
    path = calib_obs_path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; make it with `python eval/calibrate.py policy.checkpoint={checkpoint}` "
                                "(the fitted cache methods fit on the calibration observations)")
    key = (str(Path(checkpoint).resolve()), *policy_signature(policy), n_obs)
    if key not in _TRAJECTORIES:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in policy.config.obs_keys if k not in z.files]
            if missing:
                raise ValueError(f"{path} lacks observation keys {missing}; re-run eval/calibrate.py")
            obs = {k: torch.from_numpy(z[k][:n_obs]).to(policy.device) for k in policy.config.obs_keys}
        _TRAJECTORIES.clear()  # one policy's trajectory at a time: ~100 MB for DP-T at K=100
        _TRAJECTORIES[key] = record_trajectory(policy, obs)
    return _TRAJECTORIES[key]


def _knob(cfg, name, default=None):
    value = cfg.get(name, default) if hasattr(cfg, "get") else default
    if value is None and default is None:
        raise ValueError(f"cache {cfg.get('name')!r} needs the knob cache.{name}")
    return default if value is None else value


def make_cache(policy, checkpoint: str | Path, cfg) -> Schedule | Strategy | None:
    """The schedule or strategy of the cache config ``cfg`` (a mapping with ``name`` and the method's knobs,
    e.g. ``configs/cache/teacache.yaml``); None for ``none``. Every result is checked against the policy."""
    from bac import profiling
    from bac.strategies import (BWCache, FBCache, HyCa, LinearCorrection, MaskForecast, TeaCache, ToCa,
                                make_forecaster)

    name = str(cfg.get("name"))
    if name not in CACHE_METHODS:
        raise ValueError(f"unknown cache {name!r}; known caches: {list(CACHE_METHODS)}")
    if name in SCHEDULE_METHODS:
        given = cfg.get("n_updates", 10)
        return make_schedule(policy, checkpoint, name, n_updates=given if isinstance(given, int) else int(given or -1),
                             n_bubble=int(cfg.get("n_bubble", 5) or 0), metric=str(cfg.get("metric", "cosine")),
                             schedule_path=cfg.get("schedule"))
    scheduler, K, model_hash = policy_signature(policy)
    meta = {"scheduler": scheduler, "model_hash": model_hash}
    infos = [info for _, _, info in find_blocks(policy.model)]
    names = [b.name for b in infos]
    interval, warmup = int(cfg.get("interval", 1) or 1), int(cfg.get("warmup", 1) or 1)

    def interval_mask(method):
        return profiling.interval_schedule(names, K, interval, warmup, method=method, **meta)

    if name == "fora":
        return interval_mask("fora")
    if name == "delta_dit":
        return profiling.delta_dit_schedule(infos, K, interval, int(_knob(cfg, "n_cached_layers")),
                                            float(cfg.get("boundary", 0.5)), **meta)
    if name == "profiling":
        calib = Calibration.load(calibration_path(checkpoint, scheduler, K))
        errors = dict(zip([b.name for b in calib.blocks], calib.errors))
        return profiling.profiling_schedule(infos, [errors[n] for n in names], K, int(_knob(cfg, "n_always")),
                                            interval, warmup, calibration={"source": "block drift"}, **meta)
    if name == "toca":
        return ToCa(interval, float(cfg.get("ratio", 0.3)), float(cfg.get("freq_weight", 0.25)))
    if name == "fbcache":
        return FBCache(float(_knob(cfg, "threshold")))
    if name == "bwcache":
        return BWCache(float(_knob(cfg, "threshold")), int(cfg.get("max_reuse", 5)))
    order = int(cfg.get("order", 1) or 1)
    if name in ("taylorseer", "foca", "abcache"):
        forecaster = make_forecaster({"taylorseer": "taylor", "foca": "foca", "abcache": "adams_bashforth"}[name], order)
        return MaskForecast(interval_mask(name), forecaster, name=name)
    if name == "bac_forecast":
        mask = make_schedule(policy, checkpoint, "bac", n_updates=int(_knob(cfg, "n_updates")),
                             n_bubble=int(cfg.get("n_bubble", 5)), metric=str(cfg.get("metric", "cosine")))
        return MaskForecast(mask, make_forecaster(str(cfg.get("forecaster", "taylor")), order), name=name)
    # fitted on an uncached run over the calibration observations
    blocks, features, first = calibration_trajectory(policy, checkpoint, int(cfg.get("n_obs", 8)))
    if [b.name for b in blocks] != names:
        raise RuntimeError("recorded blocks differ from the model's blocks")
    if name == "teacache":
        fit = profiling.fit_teacache(first, features)
        strategy = TeaCache(float(_knob(cfg, "delta")), fit["coeffs"])
        strategy.fit = fit
        return strategy
    if name == "ertacache":
        mask = profiling.erta_schedule(names, features, int(_knob(cfg, "n_updates")), **meta)
        return MaskForecast(mask, LinearCorrection(profiling.fit_erta(mask, features, names)), name=name)
    if name == "hyca":
        pool = [make_forecaster(p["name"], int(p.get("order", 1))) for p in cfg.get("pool")]
        mask = interval_mask("hyca")
        assign, fit = profiling.fit_hyca(features, mask, pool, names, int(cfg.get("n_groups", 8)))
        strategy = MaskForecast(mask, HyCa(pool, assign), name=name)
        strategy.fit = fit
        return strategy
    raise AssertionError(name)


def cache_summary(cache) -> dict:
    """What a run's summary records about its schedule or strategy."""
    if cache is None:
        return {}
    if isinstance(cache, Schedule):
        return {"method": cache.method, "n_updates": cache.n_updates, "n_bubble": cache.n_bubble,
                "metric": cache.metric, "num_steps": cache.num_steps,
                "computed_fraction": round(cache.computed_fraction(), 4)}
    out = cache.describe()
    if getattr(cache, "fit", None):
        out["fit"] = cache.fit
    return out
