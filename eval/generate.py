"""Sample an image grid with a cache method and without, from identical noise, in one process.

    python eval/generate.py backend=dit_image cache=bac
    python eval/generate.py backend=dit_image cache=uniform cache.n_updates=10 backend.num_inference_steps=50

Writes to the hydra run folder ``grid.png`` (one row per class: the uncached samples | the cached ones) and
``summary.json``: batch-``generate.timing_batch`` latency of both (interleaved rounds, ``bac.timing``), speedup
and analytic FLOPs ratio of the cache; PSNR, SSIM and rel-L2 of the cached grid against the uncached one; and,
for both grids, the accuracy of the checkpoint's digit classifier on the class asked for and the Fréchet
distance of its features against the real test digits (``fd_real_train`` is that distance for real training
digits: the floor). Calibrated methods use ``<checkpoint>/calibration/``, made on first use.
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

from bac.methods import build_cache  # noqa: E402
from bac.metrics import latency_stats  # noqa: E402
from bac.protocol import attach_to  # noqa: E402
from bac.timing import Timed, device_sync, time_interleaved  # noqa: E402
from backends.digit_classifier import feature_fd, load_classifier  # noqa: E402
from backends.digits import load_digits_split  # noqa: E402
from backends.dit_image import DiTCacheTarget, load_dit_image  # noqa: E402
from backends.image_metrics import psnr, rel_l2, ssim  # noqa: E402
from eval.common import device_name, pick_device, resolve_path, write_atomic  # noqa: E402

BACKENDS = ("dit_image",)


def grid_image(left: torch.Tensor, right: torch.Tensor, rows: int, scale: int) -> np.ndarray:
    """(N, 1, H, W) pairs in [-1, 1] -> uint8 (rows*H*s, (2*cols*W + W)*s): left grid | a gap | right grid."""
    def tile(x):
        n, _, h, w = x.shape
        x = ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        return x.reshape(rows, n // rows, h, w).permute(0, 2, 1, 3).reshape(rows * h, (n // rows) * w)

    a, b = tile(left), tile(right)
    gap = torch.full((a.shape[0], left.shape[-1]), 128, dtype=torch.uint8)
    img = torch.cat([a, gap, b], 1)
    return img.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()


def generate(cfg: DictConfig, out: Path) -> dict:
    torch.set_num_threads(int(cfg.threads))
    b, g = cfg.backend, cfg.generate
    if b.name not in BACKENDS:
        raise ValueError(f"unknown backend {b.name!r}; known backends: {list(BACKENDS)}")
    device = pick_device(str(cfg.device))
    ckpt = resolve_path(str(b.checkpoint))
    gen = load_dit_image(ckpt, scheduler=b.scheduler, num_inference_steps=int(b.num_inference_steps),
                         guidance_scale=float(b.guidance_scale)).to(device)
    target = DiTCacheTarget(gen, ckpt, n_calibration=int(b.n_calibration))
    cache_cfg = OmegaConf.to_container(cfg.cache, resolve=True)
    cache = build_cache(target, cache_cfg)
    C = gen.config.num_classes
    labels = torch.arange(C).repeat_interleave(int(g.n_per_class))  # (C * n_per_class,), row c: class c
    noise = gen.noise(len(labels), torch.Generator().manual_seed(int(g.seed)))
    gen_kw = dict(generator=torch.Generator().manual_seed(int(g.seed) + 1))  # DDPM's step noise

    ref = gen.sample(labels, noise=noise, **gen_kw).cpu()
    gen_kw = dict(generator=torch.Generator().manual_seed(int(g.seed) + 1))
    engine = attach_to(target, cache, profile=True)
    try:
        cached = gen.sample(labels, noise=noise, cursor=engine, **gen_kw).cpu()
        flops_ratio, stats = engine.flops_ratio(), engine.stats()
    finally:
        engine.detach()

    # batch-n latency, interleaved; the cache is attached and detached off the clock
    nb = int(g.timing_batch)
    t_labels = labels[torch.linspace(0, len(labels) - 1, nb).long()]
    t_noise = noise[:nb]
    state = {}
    configs = [Timed("none", lambda r: gen.sample(t_labels, noise=t_noise))]
    if cache is not None:
        configs.append(Timed(
            "cache", lambda r: gen.sample(t_labels, noise=t_noise, cursor=state["engine"]),
            before=lambda r: state.__setitem__("engine", attach_to(target, cache)),
            after=lambda r: state.pop("engine").detach()))
    times = time_interleaved(configs, int(g.timing_rounds), 2, device_sync(device))
    lat = {k: latency_stats(v) for k, v in times.items()}
    t_none = float(np.median(times["none"]))
    t_cache = float(np.median(times["cache"])) if cache is not None else t_none

    clf_dir = ckpt if (ckpt / "classifier.json").exists() else None
    (x_train, _), (x_test, _) = load_digits_split(gen.config.image_size)
    dist = {}
    if clf_dir is not None:
        clf = load_classifier(clf_dir)
        with torch.no_grad():
            for name, x in (("uncached", ref), ("cached", cached)):
                dist[name] = {"accuracy": float((clf(x).argmax(1) == labels).float().mean()),
                              "fd": feature_fd(clf, x, x_test)}
            dist["fd_real_train"] = feature_fd(clf, x_train, x_test)

    summary = {
        "backend": OmegaConf.to_container(b, resolve=True), "cache": cache_cfg,
        "K": gen.config.num_inference_steps, "scheduler": type(gen.scheduler).__name__,
        "n_images": len(labels), "device": device_name(device),
        "latency_ms": {"none": lat["none"], "cache": lat.get("cache", lat["none"])},
        "timing_batch": nb, "speedup": t_none / t_cache, "flops_ratio": flops_ratio,
        "psnr_db": psnr(cached, ref), "ssim": ssim(cached, ref), "rel_l2": rel_l2(cached, ref),
        "classifier": dist, "engine": {k: v for k, v in stats.items() if k != "blocks"},
    }
    out.mkdir(parents=True, exist_ok=True)
    import imageio.v3 as iio

    iio.imwrite(out / "grid.png", grid_image(ref, cached, C, int(g.scale)))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    acc = {k: round(v["accuracy"], 3) for k, v in dist.items() if isinstance(v, dict)}
    fd = {k: round(v["fd"], 2) for k, v in dist.items() if isinstance(v, dict)}
    print(f"{cache_cfg['name']}: {summary['speedup']:.2f}x, FLOPs {flops_ratio:.3f}, PSNR {summary['psnr_db']:.1f} dB, "
          f"SSIM {summary['ssim']:.3f}, rel-L2 {summary['rel_l2']:.3f}, accuracy {acc}, "
          f"FD {fd} -> {out}")
    return summary


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="generate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    generate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
