"""Sample a grid with a cache method and without, from identical noise, in one process.

    python eval/generate.py backend=dit_image cache=bac
    python eval/generate.py backend=dit_image cache=uniform cache.n_updates=10 backend.num_inference_steps=50
    python eval/generate.py backend=dit_video cache=bac
    python eval/generate.py backend=dit_image cache=diffusers_fbcache cache.threshold=0.1   # a peer (eval/peers.py)

Writes to the hydra run folder ``grid.png`` (one row per class: the uncached samples | the cached ones; for
video, one clip per class with its frames side by side) and, for video, ``grid.gif`` (the whole grid, animated),
and ``summary.json``: latency of both at each of ``backend.timing_batches`` (interleaved rounds,
``bac.timing``), speedup per batch and analytic FLOPs ratio of the cache; PSNR, SSIM and rel-L2 of the cached
samples against the uncached ones (per image; per frame for video); and, for both grids, the accuracy of the
checkpoint's digit classifier on the class asked for (per frame for video) and the Fréchet distance of its
features against real test digits (``fd_real_train`` is that distance for real training digits: the floor).
Calibrated methods use ``<checkpoint>/calibration/``, made on first use. A peer (``cache=<name in eval.peers.PEERS>``)
runs instead of the engine, applied and removed around each cached call; its FLOPs ratio is its block fraction
(attention/FF work computed) times its steps over K.
"""
from __future__ import annotations

import hashlib
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
from backends import backend  # noqa: E402
from backends.digit_classifier import feature_fd, load_classifier, paired_change  # noqa: E402
from backends.generator import GeneratorCacheTarget  # noqa: E402
from backends.image_metrics import psnr, rel_l2, ssim  # noqa: E402
from eval.common import device_name, pick_device, resolve_path, write_atomic  # noqa: E402
from eval.peers import PEERS, build_peer  # noqa: E402


def grid_image(left: torch.Tensor, right: torch.Tensor, rows: int, scale: int) -> np.ndarray:
    """(N, 1, H, W) pairs in [-1, 1] -> uint8 (rows*H*s, (2*cols*W + W)*s): left grid | a gap | right grid;
    image i in row i // cols."""
    def tile(x):
        n, _, h, w = x.shape
        x = ((x[:, 0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
        return x.reshape(rows, n // rows, h, w).permute(0, 2, 1, 3).reshape(rows * h, (n // rows) * w)

    a, b = tile(left), tile(right)
    gap = torch.full((a.shape[0], left.shape[-1]), 128, dtype=torch.uint8)
    img = torch.cat([a, gap, b], 1)
    return img.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()


def write_grids(out: Path, gen, ref: torch.Tensor, cached: torch.Tensor, rows: int, scale: int) -> None:
    """grid.png (and grid.gif for clips) of the uncached | the cached samples, row r: class r."""
    import imageio.v3 as iio

    if ref.dim() == 4:  # images (N, 1, H, W)
        iio.imwrite(out / "grid.png", grid_image(ref, cached, rows, scale))
        return
    n, _, F, H, W = ref.shape  # clips (N, 1, F, H, W), row r holds n // rows clips of class r
    first = torch.arange(rows) * (n // rows)  # one clip per class, its frames side by side
    strip = lambda x: x[first].transpose(1, 2).flatten(0, 1)  # noqa: E731  (rows * F, 1, H, W)
    iio.imwrite(out / "grid.png", grid_image(strip(ref), strip(cached), rows, scale))
    frames = [grid_image(ref[:, :, f], cached[:, :, f], rows, max(1, scale // 2)) for f in range(F)]
    iio.imwrite(out / "grid.gif", np.stack(frames), duration=200, loop=0)


class Method:
    """What a cached sampling call runs with: an engine cache on ``target`` (``cache`` None: the engine computes
    everything) or a peer (``eval.peers``). ``start``/``stop`` attach and detach it (off the clock when timed)."""

    def __init__(self, target: GeneratorCacheTarget, cache=None, peer=None):
        self.target, self.cache, self.peer, self.engine = target, cache, peer, None

    def start(self, profile: bool = False) -> None:
        if self.peer is not None:
            self.peer.apply(count=profile)
        else:
            self.engine = attach_to(self.target, self.cache, profile=profile)

    def stop(self) -> None:
        if self.peer is not None:
            self.peer.remove()
        else:
            self.engine, engine = None, self.engine
            engine.detach()

    def sample(self, gen, labels: torch.Tensor, noise: torch.Tensor, **kw) -> torch.Tensor:
        if self.peer is None:
            return gen.sample(labels, noise=noise, cursor=self.engine, **kw)
        with self.peer.call_context():
            return gen.sample(labels, noise=noise, num_inference_steps=self.peer.num_inference_steps, **kw)

    def stats(self, gen) -> tuple[float | None, dict]:
        """(FLOPs ratio, what the run did) after a sample between ``start(profile=True)`` and ``stop``."""
        if self.peer is None:
            return self.engine.flops_ratio(), self.engine.stats()
        K = gen.config.num_inference_steps
        steps, fraction = self.peer.num_inference_steps or K, self.peer.block_fraction()
        ratios = getattr(self.peer, "ratios", None)
        return (None if fraction is None else fraction * steps / K,
                {"block_fraction": fraction, "num_inference_steps": steps,
                 **({"mag_ratios": ratios} if ratios is not None else {})})


def load_backend(b, device, blocks: str | None = None, gen=None):
    """(generator, cache target) of backend config ``b`` (a ``configs/backend`` mapping); ``gen`` reuses a loaded
    generator with another block granularity."""
    _, load = backend(str(b["name"]))
    ckpt = resolve_path(str(b["checkpoint"]))
    if gen is None:
        gen = load(ckpt, scheduler=b["scheduler"], num_inference_steps=int(b["num_inference_steps"]),
                   guidance_scale=float(b["guidance_scale"])).to(device)
    return gen, GeneratorCacheTarget(gen, ckpt, n_calibration=int(b["n_calibration"]), blocks=str(blocks or b["blocks"]))


def make_method(cache_cfg: dict, target: GeneratorCacheTarget, seed: int = 0) -> Method:
    """An engine cache (``bac.methods``) or a peer (``eval.peers``; MagCache calibrates on one uncached sample
    of one image per class) from a ``configs/cache`` mapping."""
    gen = target.gen
    if cache_cfg["name"] in PEERS:
        C = gen.config.num_classes
        return Method(target, peer=build_peer(cache_cfg, gen.model, calibrate=lambda: gen.sample(
            torch.arange(C), generator=torch.Generator().manual_seed(seed + 3))))
    return Method(target, cache=build_cache(target, cache_cfg))


def timing_inputs(gen, nb: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels (classes 0, 1, ... cycling) and noise of a timed batch of ``nb``."""
    return torch.arange(nb) % gen.config.num_classes, gen.noise(nb, torch.Generator().manual_seed(seed + 2))


def timed_sampling(label: str, gen, method: Method | None, labels: torch.Tensor, noise: torch.Tensor) -> Timed:
    """One ``bac.timing.Timed`` entry: uncached sampling (``method`` None) or with ``method`` started before and
    stopped after each timed call, off the clock."""
    if method is None:
        return Timed(label, lambda r: gen.sample(labels, noise=noise))
    return Timed(label, lambda r: method.sample(gen, labels, noise), before=lambda r: method.start(),
                 after=lambda r: method.stop())


def reference_samples(gen, target, labels: torch.Tensor, noise: torch.Tensor, step_noise, g) -> torch.Tensor:
    """The uncached samples of ``labels`` from ``noise``; with ``generate.reference_dir``, kept there and reused by
    every later row of a table whose weights, scheduler, K, guidance, seed and labels are the same (the file's key
    holds all of them, so another model or setting never reads it)."""
    folder = g.get("reference_dir")
    if folder is None:
        return gen.sample(labels, noise=noise, **step_noise()).cpu()
    sig = target.cache_signature()
    key = {"model_hash": sig.model_hash, "scheduler": sig.scheduler, "K": sig.num_steps,
           "guidance_scale": float(gen.config.guidance_scale), "seed": int(g.seed),
           "labels": labels.tolist(), "shape": list(noise.shape)}
    key = json.dumps(key, sort_keys=True)
    path = resolve_path(str(folder)) / f"reference_{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.exists():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["key"] == key:
            return saved["samples"]
    ref = gen.sample(labels, noise=noise, **step_noise()).cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"key": key, "samples": ref}, tmp)
    tmp.replace(path)
    return ref


def generate(cfg: DictConfig, out: Path) -> dict:
    torch.set_num_threads(int(cfg.threads))
    b, g = cfg.backend, cfg.generate
    device = pick_device(str(cfg.device))
    batches = [int(x) for x in b.timing_batches]
    if not batches or min(batches) < 1:
        raise ValueError(f"backend.timing_batches must list batch sizes >= 1, got {batches}")
    if int(g.timing_rounds) < 0:
        raise ValueError(f"generate.timing_rounds must be >= 0 (0: no timing), got {g.timing_rounds}")
    gen, target = load_backend(b, device)
    ckpt = target.checkpoint
    cache_cfg = OmegaConf.to_container(cfg.cache, resolve=True)
    C = gen.config.num_classes
    method = make_method(cache_cfg, target, int(g.seed))
    labels = torch.arange(C).repeat_interleave(int(g.n_per_class))  # (C * n_per_class,), row c: class c
    noise = gen.noise(len(labels), torch.Generator().manual_seed(int(g.seed)))
    step_noise = lambda: dict(generator=torch.Generator().manual_seed(int(g.seed) + 1))  # noqa: E731  DDPM's

    ref = reference_samples(gen, target, labels, noise, step_noise, g)
    method.start(profile=True)
    try:
        cached = method.sample(gen, labels, noise, **step_noise()).cpu()
        flops_ratio, stats = method.stats(gen)
    finally:
        method.stop()

    # latency at each batch size, interleaved; the cache is attached and detached off the clock
    latency, speedup = {}, {}
    if int(g.timing_rounds) > 0:
        configs = []
        for nb in batches:
            t_labels, t_noise = timing_inputs(gen, nb, int(g.seed))
            configs.append(timed_sampling(f"none@{nb}", gen, None, t_labels, t_noise))
            if method.cache is not None or method.peer is not None:
                configs.append(timed_sampling(f"cache@{nb}", gen, method, t_labels, t_noise))
        times = time_interleaved(configs, int(g.timing_rounds), 2, device_sync(device))
        for nb in batches:
            none, cached_t = times[f"none@{nb}"], times.get(f"cache@{nb}", times[f"none@{nb}"])
            latency[str(nb)] = {"none": latency_stats(none), "cache": latency_stats(cached_t)}
            speedup[str(nb)] = float(np.median(none) / np.median(cached_t))

    dist = {}
    if (ckpt / "classifier.json").exists():
        clf = load_classifier(ckpt)
        (x_train, _), (x_test, _) = gen.real_split()
        x_train, x_test = gen.as_images(x_train), gen.as_images(x_test)
        image_labels = gen.image_labels(labels)
        with torch.no_grad():
            for name, x in (("uncached", ref), ("cached", cached)):
                x = gen.as_images(x)
                dist[name] = {"accuracy": float((clf(x).argmax(1) == image_labels).float().mean()),
                              "fd": feature_fd(clf, x, x_test)}
            dist["fd_real_train"] = feature_fd(clf, x_train, x_test)
            dist["change"] = paired_change(clf, gen.as_images(cached), gen.as_images(ref), image_labels, x_test)
    ref_img, cached_img = gen.as_images(ref), gen.as_images(cached)

    summary = {
        "backend": OmegaConf.to_container(b, resolve=True), "cache": cache_cfg, "blocks": target.blocks,
        "K": gen.config.num_inference_steps, "scheduler": type(gen.scheduler).__name__,
        "n_samples": len(labels), "sample_shape": list(gen.sample_shape), "device": device_name(device),
        "threads": int(cfg.threads), "timing_rounds": int(g.timing_rounds),
        "latency_ms": latency, "speedup": speedup, "flops_ratio": flops_ratio,
        "psnr_db": psnr(cached_img, ref_img), "ssim": ssim(cached_img, ref_img), "rel_l2": rel_l2(cached, ref),
        "classifier": dist,
        "peer" if method.peer is not None else "engine": {k: v for k, v in stats.items() if k != "blocks"},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_grids(out, gen, ref, cached, C, int(g.scale))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
    acc = {k: round(v["accuracy"], 3) for k, v in dist.items() if isinstance(v, dict)}
    fd = {k: round(v["fd"], 2) for k, v in dist.items() if isinstance(v, dict)}
    speed = ", ".join(f"{v:.2f}x at batch {k}" for k, v in speedup.items()) or "not timed"
    flops = "?" if flops_ratio is None else f"{flops_ratio:.3f}"
    print(f"{cache_cfg['name']}: {speed}, FLOPs {flops}, PSNR {summary['psnr_db']:.1f} dB, "
          f"SSIM {summary['ssim']:.3f}, rel-L2 {summary['rel_l2']:.3f}, accuracy {acc}, "
          f"FD {fd} -> {out}")
    return summary


@hydra.main(version_base=None, config_path=str(ROOT / "configs"), config_name="generate")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    generate(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
