"""The DiT backends (backends/), image and video: a tiny random-init model of each as a bac.protocol.CacheTarget
(methods built through bac.methods exact when computing everything, reusing otherwise; detach exact), their
checkpoint round trip with the sha256 check, the clips of moving digits, the digit classifier's metrics, and
eval/generate.py end to end on a tiny checkpoint of each."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")

from bac.methods import CacheContext, build_cache, defaults  # noqa: E402
from bac.protocol import CacheTarget, attach_to  # noqa: E402
from backends.digit_classifier import (ClassifierConfig, DigitClassifier, accuracy, feature_fd,  # noqa: E402
                                       frechet_distance, load_classifier, paired_change,
                                       save_classifier)
from backends.digits import load_digits_split  # noqa: E402
from backends.dit_image import DiTImageConfig, DiTImageGenerator, load_dit_image, save_dit_image  # noqa: E402
from backends.dit_video import DiTVideoConfig, DiTVideoGenerator, load_dit_video, save_dit_video  # noqa: E402
from backends.generator import GeneratorCacheTarget  # noqa: E402
from backends.image_metrics import psnr, rel_l2, ssim  # noqa: E402
from backends.moving_digits import make_clips  # noqa: E402

K = 6
TINY = DiTImageConfig(image_size=8, patch_size=2, num_layers=2, num_heads=2, head_dim=8, num_inference_steps=K)
TINY_VIDEO = DiTVideoConfig(frames=3, canvas=8, digit=4, patch_size=2, num_layers=2, num_heads=2, head_dim=8,
                            caption_dim=8, num_inference_steps=K)
KINDS = {"image": (DiTImageGenerator, TINY, save_dit_image, load_dit_image),
         "video": (DiTVideoGenerator, TINY_VIDEO, save_dit_video, load_dit_video)}


def _tiny(kind):
    torch.manual_seed(0)
    g = KINDS[kind][0](KINDS[kind][1])
    # diffusers zero-inits adaLN-zero gates and the output layer: perturb so that every block matters
    with torch.no_grad():
        for p in g.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g


@pytest.fixture(scope="module", params=["image", "video"])
def gen(request):
    return _tiny(request.param)


def _grid(gen, cursor=None):
    labels = torch.arange(4)
    noise = gen.noise(4, torch.Generator().manual_seed(1))
    return gen.sample(labels, noise=noise, cursor=cursor)


def test_target_is_a_cache_target_with_the_dit_blocks(gen):
    video = isinstance(gen, DiTVideoGenerator)
    t = "transformer." if video else ""
    target = GeneratorCacheTarget(gen)  # whole blocks, in execution order (video: spatial 0, temporal 0, spatial 1, ...)
    assert isinstance(target, CacheTarget) and target.blocks == "units"
    ctx = CacheContext(target, calibration_inputs=2)
    stacks = ("transformer_blocks", "temporal_transformer_blocks") if video else ("transformer_blocks",)
    assert ctx.names == [f"{t}{s}.{i}" for i in range(2) for s in stacks]
    assert {b.kind for b in ctx.blocks} == {"block"} and [b.layer for b in ctx.blocks] == list(range(len(ctx.names)))
    # branches: the model's declaration (video) or bac's default patterns (image)
    ctx = CacheContext(GeneratorCacheTarget(gen, blocks="branches"), calibration_inputs=2)
    if video:
        assert ctx.names == [n for i in range(2) for n in (
            *(f"{t}transformer_blocks.{i}.{m}" for m in ("attn1", "attn2", "ff")),
            *(f"{t}temporal_transformer_blocks.{i}.{m}" for m in ("attn1", "ff")))]
    else:
        assert ctx.names == [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")]
    assert ctx.signature.scheduler == "DDIMScheduler" and ctx.K == K
    with pytest.raises(ValueError, match="blocks='layers' is not known"):
        GeneratorCacheTarget(gen, blocks="layers")


EVERYTHING = {"none": {}, "uniform": {"n_updates": K}, "bac": {"n_updates": K, "n_bubble": 1},
              "fbcache": {"threshold": 0.0}, "taylorseer": {"interval": 1}}
SKIPPING = {"uniform": {"n_updates": 2}, "bac": {"n_updates": 2, "n_bubble": 1}, "fbcache": {"threshold": 10.0},
            "taylorseer": {"interval": 3}}


@pytest.mark.parametrize("blocks", ["units", "branches"])
def test_compute_everything_is_exact_skipping_reuses_and_detach_is_exact(gen, blocks):
    state = {k: v.clone() for k, v in gen.model.state_dict().items()}
    reference = _grid(gen)
    ctx = CacheContext(GeneratorCacheTarget(gen, blocks=blocks), calibration_inputs=2)
    for method, knobs in EVERYTHING.items():
        engine = attach_to(ctx.target, build_cache(ctx, {**defaults(method), **knobs}))
        try:
            out = _grid(gen, engine)
        finally:
            engine.detach()
        assert torch.equal(out, reference), method
        assert engine.reused.sum() == 0, method
    for method, knobs in SKIPPING.items():
        engine = attach_to(ctx.target, build_cache(ctx, {**defaults(method), **knobs}))
        try:
            out = _grid(gen, engine)
        finally:
            engine.detach()
        assert engine.reused.sum() > 0, method
        assert not torch.equal(out, reference) and rel_l2(out, reference) < 0.5, method
    assert all("forward" not in vars(m) for m in gen.model.modules())
    assert all(torch.equal(v, state[k]) for k, v in gen.model.state_dict().items())
    assert torch.equal(_grid(gen), reference)


def test_guidance_is_one_batched_call(gen):
    g = type(gen)(type(gen.config)(**{**gen.config.__dict__, "guidance_scale": 2.0}))
    g.model.load_state_dict(gen.model.state_dict())
    calls = []
    h = g.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0] if a else None))
    try:
        out = _grid(g)
    finally:
        h.remove()
    assert calls == [8] * K and out.shape == (4, *gen.sample_shape)  # 4 conditional + 4 unconditional
    assert not torch.equal(out, _grid(gen))


def test_save_load_round_trip_and_sha256_check(gen, tmp_path):
    kind = "image" if isinstance(gen, DiTImageGenerator) else "video"
    save, load = KINDS[kind][2:]
    save(gen, tmp_path, {"steps": 0})
    loaded = load(tmp_path, num_inference_steps=K)
    assert torch.equal(_grid(loaded), _grid(gen))
    with pytest.raises(ValueError, match="cannot be overridden"):
        load(tmp_path, num_layers=3)
    other = load_dit_video if kind == "image" else load_dit_image
    with pytest.raises(ValueError, match="a checkpoint of another backend"):
        other(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ValueError, match="config.json does not match the sha256"):
        load(tmp_path)
    save(gen, tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="model.safetensors does not match the sha256"):
        load(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="train one with `python eval/train_dit.py"):
        load(tmp_path)


def test_moving_digit_clips():
    (x, y), _ = load_digits_split(4)
    clips = make_clips(x[:50], frames=6, canvas=10, generator=torch.Generator().manual_seed(0))
    assert clips.shape == (50, 1, 6, 10, 10) and clips.min() >= -1 and clips.max() <= 1
    for i in range(50):
        bright = clips[i, 0] > -1  # (F, S, S): where the digit is
        ys = [int(torch.nonzero(bright[f].any(1))[0]) for f in range(6) if bright[f].any()]
        xs = [int(torch.nonzero(bright[f].any(0))[0]) for f in range(6) if bright[f].any()]
        assert len(ys) == 6 and (len(set(ys)) > 1 or len(set(xs)) > 1), i  # the digit is in every frame and moves
        assert all(abs(a - b) <= 2 for a, b in zip(ys, ys[1:])) and all(abs(a - b) <= 2 for a, b in zip(xs, xs[1:]))
    # every frame holds the digit's pixels unchanged (placed at integer offsets, never clipped)
    assert torch.allclose(torch.sort(clips[:, :, 0].flatten(1), 1).values[:, -16:],
                          torch.sort(x[:50].flatten(1), 1).values)
    with pytest.raises(ValueError, match="does not fit"):
        make_clips(x[:2], 3, 3, torch.Generator())


def test_digits_split_and_classifier_metrics(tmp_path):
    (x, y), (xt, yt) = load_digits_split(16)
    assert x.shape[1:] == (1, 16, 16) and len(x) + len(xt) == 1797 and x.min() >= -1 and x.max() <= 1
    assert set(y.tolist()) == set(range(10))
    torch.manual_seed(0)
    clf = DigitClassifier(ClassifierConfig(image_size=16)).eval()
    assert 0 <= accuracy(clf, xt, yt) <= 1
    assert abs(feature_fd(clf, xt, xt)) < 1e-6
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert abs(frechet_distance(a, a)) < 1e-9
    assert frechet_distance(a, a + 1.0) == pytest.approx(4.0, rel=1e-6)  # mean shift of 1 in 4 dimensions
    same = paired_change(clf, xt[:60], xt[:60], yt[:60], xt[60:])
    assert same == {"accuracy": 0.0, "accuracy_se": 0.0, "fd": 0.0, "fd_se": 0.0}
    moved = paired_change(clf, torch.roll(xt[:60], 2, -1), xt[:60], yt[:60], xt[60:])
    assert moved["fd"] > 0 and moved["fd_se"] > 0
    save_classifier(clf, tmp_path)
    assert torch.equal(load_classifier(tmp_path)(xt[:5]), clf(xt[:5]))


def test_image_metrics():
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert psnr(x, x) == 100.0 and ssim(x, x) == pytest.approx(1.0) and rel_l2(x, x) == 0.0
    y = (x + 0.1).clamp(-1, 1)
    assert 20 < psnr(y, x) < 40 and ssim(y, x) < 1 and 0 < rel_l2(y, x) < 1


def test_generate_end_to_end_on_a_tiny_checkpoint(gen, tmp_path):
    from eval.generate import generate
    from tests.conftest import compose_cfg

    video = isinstance(gen, DiTVideoGenerator)
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    files = save_classifier(DigitClassifier(ClassifierConfig(image_size=gen.sample_shape[-1])).eval(), ckpt)
    KINDS["video" if video else "image"][2](gen, ckpt, {"steps": 0}, extra_files=tuple(files))
    cfg = compose_cfg(f"backend=dit_{'video' if video else 'image'}", "cache=bac", "cache.n_updates=2",
                      f"backend.checkpoint={ckpt}", f"backend.num_inference_steps={K}", "backend.n_calibration=2",
                      "backend.timing_batches=[1,2]", "generate.n_per_class=2", "generate.timing_rounds=1",
                      config_name="generate")
    summary = generate(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "grid.png").exists() and (tmp_path / "out" / "grid.gif").exists() == video
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("speedup", "flops_ratio", "psnr_db", "ssim", "rel_l2", "latency_ms", "classifier"):
        assert key in saved, key
    assert set(saved["speedup"]) == set(saved["latency_ms"]) == {"1", "2"}
    assert saved["flops_ratio"] < 1 and summary["n_samples"] == 20 and saved["sample_shape"] == list(gen.sample_shape)
    assert set(saved["classifier"]) == {"uncached", "cached", "fd_real_train", "change"}
    change = saved["classifier"]["change"]
    assert change["fd"] == pytest.approx(saved["classifier"]["cached"]["fd"] - saved["classifier"]["uncached"]["fd"])
    assert (ckpt / "calibration" / f"DDIMScheduler_K{K}_n2_units.npz").exists()
    cfg.backend.blocks = "branches"  # another granularity: its own calibration file
    generate(cfg, tmp_path / "out2")
    assert (ckpt / "calibration" / f"DDIMScheduler_K{K}_n2_branches.npz").exists()
    cfg.cache, cfg.generate.timing_rounds = compose_cfg("cache=none", config_name="generate").cache, 0
    untimed = generate(cfg, tmp_path / "runs" / "none")
    assert untimed["speedup"] == {} and untimed["latency_ms"] == {} and untimed["psnr_db"] == 100.0
    # the uncached reference kept on disk and reused: the same numbers; another seed is another file
    cfg.generate.reference_dir = str(tmp_path / "refs")
    first = generate(cfg, tmp_path / "ref1")
    again = generate(cfg, tmp_path / "ref2")
    assert len(list((tmp_path / "refs").glob("reference_*.pt"))) == 1
    assert first["classifier"] == again["classifier"] == untimed["classifier"]
    cfg.generate.seed = 1
    generate(cfg, tmp_path / "ref3")
    assert len(list((tmp_path / "refs").glob("reference_*.pt"))) == 2
    cfg.generate.seed, cfg.generate.reference_dir = 0, None
    # every run re-timed back to back; the report takes those speedups
    from eval.generate_bench import bench
    from eval.generate_report import load

    for name in ("out", "out2"):
        (tmp_path / name).rename(tmp_path / "runs" / name)
    timed = bench(tmp_path / "runs", rounds=1)
    assert set(timed["speedup"]) == {"1", "2"} and set(timed["speedup"]["1"]) == {"out", "out2"}
    rows = {r["row"]: r for r in load([tmp_path / "runs"])}
    assert rows["out2"]["speedup"][2] == timed["speedup"]["2"]["out2"] and rows["none"]["speedup"] == {1: 1.0, 2: 1.0}
    with pytest.raises(ValueError, match="unknown backend 'dit_audio'"):
        generate(compose_cfg("backend=dit_image", "backend.name=dit_audio", config_name="generate"), tmp_path / "x")


def test_train_dit_trains_a_tiny_checkpoint_and_continues_from_it(tmp_path):
    from eval.train_dit import main

    tiny = ["--image-size", "8", "--num-layers", "1", "--num-heads", "2", "--head-dim", "8", "--batch-size", "4",
            "--classifier-epochs", "1", "--log-every", "1"]
    first = main(["--out", str(tmp_path / "a"), "--steps", "2", *tiny])
    assert first["steps"] == 2 and first["init"] is None and len(first["loss_curve"]) == 2
    a = load_dit_image(tmp_path / "a")
    again = main(["--out", str(tmp_path / "b"), "--steps", "1", "--init", str(tmp_path / "a"), *tiny])
    assert again["init"] == str(tmp_path / "a") and again["classifier_epochs"] == 0
    b = load_dit_image(tmp_path / "b")
    assert a.config == b.config and not torch.equal(a.model.pos_embed.proj.weight, b.model.pos_embed.proj.weight)
    assert torch.equal(load_classifier(tmp_path / "a").fc.weight, load_classifier(tmp_path / "b").fc.weight)
    with pytest.raises(SystemExit, match="not the architecture asked for"):
        main(["--out", str(tmp_path / "c"), "--steps", "1", "--init", str(tmp_path / "a"),
              *tiny[:2], "--num-layers", "2", *tiny[4:]])
