"""Calibrate a checkpoint for caching: record every block at every denoising step, save the similarities.

    python eval/calibrate.py env=robomimic env.task=lift              # the shipped Lift policy, DDPM-100
    python eval/calibrate.py env=robomimic env.task=can policy.scheduler=ddim policy.num_inference_steps=10
    python eval/calibrate.py env=robomimic calibrate.n_obs=16 calibrate.dataset=data/lift.hdf5

Runs the uncached policy on ``calibrate.n_obs`` observations, streams each block's residual delta at each of
the K steps into its similarity sums (``bac.calibration.calibrate``), and writes ``<checkpoint>/calibration/<Scheduler>_K<K>.npz``
(per-block K x K matrices for every metric, Bubbling Union scores), the observations themselves
(``calib_obs.npz``: TeaCache, HyCa and ERTACache fit on an uncached run over them), plus schedule JSONs for the
calibrated methods at the budgets in ``calibrate.n_updates`` under ``<checkpoint>/schedules/``.

A VLA (``policy=vla``) calibrates on the first ``calibrate.n_obs`` observations of the ``calib_obs.npz`` its
training script wrote (images and instructions); without a saved calibration, its calibrated caches make the same
one in memory each time they are built.

Where the observations come from: with ``calibrate.dataset`` unset and a checkpoint that already has
``calibration/calib_obs.npz`` (every shipped one does), the same observations again, so that every
(sampler, K) of a checkpoint is calibrated on one set and a fresh clone needs no demos; otherwise
``calibrate.n_obs`` observations drawn from the training demos (and a held-out set for eval/bench.py).
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
from omegaconf import DictConfig  # noqa: E402

from bac.calibration import Calibration, calibrate as calibrate_target  # noqa: E402
from policies import load_policy  # noqa: E402
from policies.cache_target import (DPTCacheTarget, bench_obs_path, calib_obs_path, calibration_path,  # noqa: E402
                                   policy_signature)
from policies.data import load_demos  # noqa: E402

SCHEDULE_METHODS = ("unified_acs", "blockwise_acs", "bac")


def calibration_obs(policy, dataset: Path, n_obs: int, seed: int) -> dict[str, torch.Tensor]:
    """``n_obs`` observation histories (key -> (N, To, d)) at random steps of random training demos."""
    c = policy.config
    _, demos = load_demos(dataset, c.obs_keys)
    rng = np.random.default_rng(seed)
    windows = []
    for _ in range(n_obs):
        d = demos[rng.integers(len(demos))]["obs"]
        t = int(rng.integers(c.n_obs_steps - 1, len(d)))
        windows.append(d[t - c.n_obs_steps + 1 : t + 1])  # (To, Do)
    obs = torch.from_numpy(np.stack(windows))  # (N, To, Do)
    return dict(zip(c.obs_keys, obs.split(c.obs_dims, dim=-1)))


def shipped_obs(policy, ckpt: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The observations of the checkpoint's first calibration (``calib_obs.npz``) and their source record."""
    path = calib_obs_path(ckpt)
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in policy.config.obs_keys if k not in z.files]
        if missing:
            raise ValueError(f"{path} lacks observation keys {missing}; recalibrate with calibrate.dataset=<hdf5>")
        obs = {k: torch.from_numpy(z[k]) for k in policy.config.obs_keys}
    n = next(iter(obs.values())).shape[0]
    return obs, {"calib_obs": str(path.relative_to(ckpt)), "n_obs": n}


def own_obs_count(policy, ckpt: Path, cfg: DictConfig) -> tuple[int, dict]:
    """(n, source) for a policy whose training script wrote its calibration observations (the VLA:
    images and instructions that calibrate.dataset cannot rebuild): the first ``calibrate.n_obs`` of them, with
    ``calibrate.seed``, the same run bac makes in memory when no calibration is saved (8 and 0 by default)."""
    path = calib_obs_path(ckpt)
    if cfg.calibrate.dataset is not None:
        raise ValueError(f"{ckpt} is a {type(policy).__name__}: it calibrates on {path} (written by its training "
                         "script), not on calibrate.dataset; leave calibrate.dataset unset")
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the {type(policy).__name__}'s training script writes it beside "
                                "the weights, and its calibration samples over it")
    with np.load(path, allow_pickle=False) as z:
        have = len(z[z.files[0]])
    n = min(int(cfg.calibrate.n_obs), have)  # as in memory: the first n_obs, or all there are
    if n < int(cfg.calibrate.n_obs):
        print(f"calibrate.n_obs={cfg.calibrate.n_obs} but {path} holds {have} observations: calibrating on {have}")
    return n, {"calib_obs": str(path.relative_to(ckpt)), "n_obs": n}


def calibrate(cfg: DictConfig) -> Path:
    torch.set_num_threads(int(cfg.threads))
    ckpt = Path(cfg.policy.checkpoint)
    ckpt = ckpt if ckpt.is_absolute() or ckpt.exists() else ROOT / ckpt
    policy = load_policy(ckpt, num_inference_steps=cfg.policy.num_inference_steps, scheduler=cfg.policy.scheduler)
    scheduler, K, model_hash = policy_signature(policy)
    t0 = time.time()
    calibration_path(ckpt, scheduler, K).parent.mkdir(parents=True, exist_ok=True)
    target = policy.cache_target(ckpt)
    own_obs = not isinstance(target, DPTCacheTarget)  # observations its training wrote (the VLA's images, text)
    if own_obs:
        n, source = own_obs_count(policy, ckpt, cfg)
    elif cfg.calibrate.dataset is None and calib_obs_path(ckpt).exists():
        obs, source = shipped_obs(policy, ckpt)
    else:
        dataset = cfg.calibrate.dataset or json.loads((ckpt / "train_record.json").read_text())["dataset"]
        dataset = Path(dataset) if Path(dataset).is_absolute() or Path(dataset).exists() else ROOT / dataset
        if not dataset.exists():
            raise FileNotFoundError(f"calibration dataset {dataset} does not exist and {calib_obs_path(ckpt)} is "
                                    "missing; collect demos with eval/collect.py or pass calibrate.dataset=<hdf5>")
        obs = calibration_obs(policy, dataset, int(cfg.calibrate.n_obs), int(cfg.calibrate.seed))
        shown = dataset.relative_to(ROOT) if dataset.is_relative_to(ROOT) else dataset
        source = {"dataset": str(shown), "n_obs": int(cfg.calibrate.n_obs), "seed": int(cfg.calibrate.seed)}
        np.savez_compressed(calib_obs_path(ckpt), **{k: v.numpy() for k, v in obs.items()})  # for the fitted methods
        held_out = calibration_obs(policy, dataset, int(cfg.calibrate.n_bench_obs), int(cfg.calibrate.seed) + 1)
        np.savez_compressed(bench_obs_path(ckpt), **{k: v.numpy() for k, v in held_out.items()})
    if not own_obs:
        target, n = DPTCacheTarget(policy, ckpt, obs), next(iter(obs.values())).shape[0]
    calib = calibrate_target(target, n, int(cfg.calibrate.seed), source=source)
    assert (calib.scheduler, calib.model_hash) == (scheduler, model_hash)
    out = calibration_path(ckpt, scheduler, K)
    calib.save(out)
    print(f"calibrated {len(calib.blocks)} blocks x {K} steps on {source['n_obs']} observations in {time.time() - t0:.1f} s -> {out}")
    write_schedules(calib, ckpt, K, cfg.calibrate.n_updates, cfg.calibrate.n_bubble, str(cfg.cache.get("metric", "cosine")))
    return out


def write_schedules(calib: Calibration, ckpt: Path, K: int, n_updates, n_bubbles, metric: str) -> list[Path]:
    """The schedule JSONs shipped next to a checkpoint: every calibrated method at every S in ``n_updates``,
    BAC at every n in ``n_bubbles``, under ``<ckpt>/schedules/``."""
    sched_dir = ckpt / "schedules"
    sched_dir.mkdir(exist_ok=True)
    n_bubbles = [n_bubbles] if isinstance(n_bubbles, int) else list(n_bubbles)
    paths = []
    for S in [s for s in n_updates if int(s) < K]:  # S >= K computes every step: nothing to schedule
        for method in SCHEDULE_METHODS:
            for n in (n_bubbles if method == "bac" else [0]):
                schedule = calib.schedule(method, int(S), int(n), metric)
                tag = schedule_tag(schedule)
                paths.append(sched_dir / f"{tag}.json")
                schedule.save(paths[-1])
                print(f"  {tag}: {schedule.computed_fraction():.3f} of block calls computed")
    return paths


def schedule_tag(schedule) -> str:
    """A schedule JSON's file name stem: method, S, n, metric, and the sampler and K it was made for (the
    DDPM ones, shipped first, keep their names without the sampler)."""
    sampler = "" if schedule.scheduler == "DDPMScheduler" else f"_{schedule.scheduler.removesuffix('Scheduler')}"
    n = f"_n{schedule.n_bubble}" if schedule.method == "bac" else ""
    return f"{schedule.method}_S{schedule.n_updates}{n}_{schedule.metric}{sampler}_K{schedule.num_steps}"


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="config")
def main(cfg: DictConfig) -> None:
    calibrate(cfg)


if __name__ == "__main__":
    main()
