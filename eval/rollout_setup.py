"""Setting up a rollout from a config, shared by eval/run.py (simulated and wall clock) and eval/deploy.py.

The policy is checked against the env, the loop configured, the cache built (or chosen for ``loop.budget_ms``),
and the policy wrapped as the loop's ``predict`` (warm-started per stream where ``loop.warm_start`` asks).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from bac.loop import LatencyModel, LoopConfig
from bac.rollout import ObsHistory
from bac.warmstart import WarmStart
from envs import make_env
from eval.common import as_torch
from policies.cache_target import make_cache, make_schedule


def check_env_matches_policy(env, policy) -> None:
    env_keys = set(env.observation_space.spaces)
    missing = [k for k in policy.config.obs_keys if k not in env_keys]
    if missing:
        raise KeyError(f"the env does not provide observation keys {missing} that the policy needs; it has {sorted(env_keys)}")
    for key, want in policy.config.obs_shapes().items():
        shape = env.observation_space[key].shape
        if want is None:  # text
            if shape is not None and shape != ():
                raise ValueError(f"env observation {key!r} has shape {shape}; the policy reads it as text")
        elif key in getattr(policy.config, "padded_state_keys", ()):  # narrower is zero-padded by the policy
            if int(np.prod(shape)) > want[0]:
                raise ValueError(f"env observation {key!r} has shape {shape}; the policy takes at most {want[0]} "
                                 "(narrower ones zero-padded)")
        elif len(want) == 1 and int(np.prod(shape)) != want[0]:
            raise ValueError(f"env observation {key!r} has shape {shape}; the policy was trained with dimension {want[0]}")
        elif len(want) > 1 and tuple(shape) != want:
            raise ValueError(f"env observation {key!r} has shape {shape}; the policy was trained on {want}")
    optional = getattr(policy.config, "optional_obs_shapes", dict)()  # a VLA's object keys: at least one
    if optional:
        given = [k for k in optional if k in env_keys]
        if not given:
            raise KeyError(f"the env provides none of the object keys {sorted(optional)} the policy reads; it has "
                           f"{sorted(env_keys)}")
        unseen = sorted(k for k in env_keys if k.startswith("object_") and k not in optional and k != "object_present")
        if unseen:  # a scene object the policy has no token for: it acts as if the object were not there
            warnings.warn(f"the policy has no token for the env's objects {unseen} (it reads {sorted(optional)})",
                          stacklevel=2)
        for key in given:
            shape = env.observation_space[key].shape
            if int(np.prod(shape)) != optional[key][0]:
                raise ValueError(f"env observation {key!r} has shape {shape}; the policy was trained with dimension "
                                 f"{optional[key][0]}")
    if env.action_space.shape[-1] != policy.config.action_dim:
        raise ValueError(f"env action dim {env.action_space.shape[-1]} != policy action dim {policy.config.action_dim}")


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


def token_reuse(cfg: DictConfig, policy, loop: LoopConfig):
    """The VLA's ``TokenReuse`` that ``policy.token_reuse_threshold`` asks for, or None."""
    threshold = cfg.policy.get("token_reuse_threshold")
    if threshold is None:
        return None
    from policies.vla import TokenReuse, VLAPolicy

    if not isinstance(policy, VLAPolicy):
        raise ValueError(f"policy.token_reuse_threshold applies to the VLA's prefix tokens; {type(policy).__name__} has none")
    if loop.mode == "realtime" or cfg.loop.clock == "wall":
        raise ValueError("token reuse runs in the offline loop for now: the realtime clock's latency is measured "
                         "without it (time it with eval/vla_reuse.py)")
    if policy.config.image_attention == "all":
        warnings.warn("token reuse on a VLA whose image tokens attend to the state and text (image_attention='all'): "
                      "a kept image token carries the robot state of the call that computed it (measured on Lift: 7/50 "
                      "against 49/50 without reuse, where a VLA trained with --image-attention images keeps 99/100; "
                      "docs/vla.md)", stacklevel=2)
    max_age = cfg.policy.get("token_reuse_max_age")
    return TokenReuse(float(threshold), None if max_age is None else int(max_age))


class StreamPredictor:
    """``predict(obs, context)`` that tells the policy which stream each row is (``context["streams"]``, from
    bac.loop): for a policy that keeps per-stream state outside itself, such as the VLA's ``TokenReuse``."""

    takes_context = True

    def __init__(self, policy, start: int, n_chunk: int, gen: torch.Generator, token_reuse):
        self.policy, self.start, self.n_chunk, self.gen, self.token_reuse = policy, start, n_chunk, gen, token_reuse

    def __call__(self, batch: dict[str, np.ndarray], context: dict | None = None) -> np.ndarray:
        if context is None:
            raise ValueError("this predictor needs the loop's context (the stream of each row)")
        out = self.policy.predict_action(as_torch(batch), generator=self.gen, token_reuse=self.token_reuse,
                                         streams=list(context["streams"]))
        return out["action_pred"][:, self.start: self.start + self.n_chunk].cpu().numpy()


def chunk_predictor(policy, n_chunk: int, seed: int, warm_start: int = 0, token_reuse=None):
    """``predict(obs numpy) -> (B, n_chunk, Da)``: the predicted actions from the current observation's step on.
    With ``warm_start`` = k0 > 0, each stream's chunk starts from its previous one at step k0 (bac.warmstart);
    with ``token_reuse`` (policies.vla.TokenReuse), each stream keeps prefix tokens across its calls."""
    gen = torch.Generator(device=policy.device).manual_seed(seed)
    start = policy.config.n_obs_steps - 1
    if token_reuse is not None:
        if warm_start:
            raise ValueError("loop.warm_start and token reuse cannot be combined (the VLA takes no warm start)")
        return StreamPredictor(policy, start, n_chunk, gen, token_reuse)
    if warm_start:
        if not 0 < warm_start < policy.config.num_inference_steps:
            raise ValueError(f"loop.warm_start must be in [0, num_inference_steps={policy.config.num_inference_steps}),"
                             f" got {warm_start}")

        def sample(batch: dict[str, np.ndarray], init: np.ndarray | None, k0: int) -> np.ndarray:
            obs = as_torch(batch)
            init_t = None if init is None else torch.from_numpy(init)
            return policy.predict_action(obs, generator=gen, init_action=init_t, init_step=k0)["action_pred"].cpu().numpy()

        return WarmStart(sample, policy.config.n_obs_steps, n_chunk, int(warm_start))

    def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
        obs = as_torch(batch)
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
