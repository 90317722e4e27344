"""The image DiT backend (backends/): a tiny random-init DiT as a bac.protocol.CacheTarget (methods built through
bac.methods exact when computing everything, reusing otherwise; detach exact), its checkpoint round trip with
the sha256 check, the digit classifier's metrics, and eval/generate.py end to end on a tiny checkpoint."""
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
                                       frechet_distance, load_classifier, save_classifier)
from backends.digits import load_digits_split  # noqa: E402
from backends.dit_image import DiTCacheTarget, DiTImageConfig, DiTImageGenerator, load_dit_image, save_dit_image  # noqa: E402
from backends.image_metrics import psnr, rel_l2, ssim  # noqa: E402

K = 6
TINY = DiTImageConfig(image_size=8, patch_size=2, num_layers=2, num_heads=2, head_dim=8, num_inference_steps=K)


@pytest.fixture(scope="module")
def gen():
    torch.manual_seed(0)
    g = DiTImageGenerator(TINY)
    # diffusers zero-inits adaLN-zero gates and the output layer: perturb so that every block matters
    with torch.no_grad():
        for p in g.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return g


def _grid(gen, cursor=None):
    labels = torch.arange(4)
    noise = gen.noise(4, torch.Generator().manual_seed(1))
    return gen.sample(labels, noise=noise, cursor=cursor)


def test_target_is_a_cache_target_with_the_dit_blocks(gen):
    target = DiTCacheTarget(gen)
    assert isinstance(target, CacheTarget)
    ctx = CacheContext(target, calibration_inputs=2)
    assert ctx.names == [f"transformer_blocks.{i}.{m}" for i in range(2) for m in ("attn1", "ff")]
    assert ctx.signature.scheduler == "DDIMScheduler" and ctx.K == K


EVERYTHING = {"none": {}, "uniform": {"n_updates": K}, "bac": {"n_updates": K, "n_bubble": 1},
              "fbcache": {"threshold": 0.0}, "taylorseer": {"interval": 1}}
SKIPPING = {"uniform": {"n_updates": 2}, "bac": {"n_updates": 2, "n_bubble": 1}, "fbcache": {"threshold": 10.0},
            "taylorseer": {"interval": 3}}


def test_compute_everything_is_exact_skipping_reuses_and_detach_is_exact(gen):
    state = {k: v.clone() for k, v in gen.model.state_dict().items()}
    reference = _grid(gen)
    ctx = CacheContext(DiTCacheTarget(gen), calibration_inputs=2)
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
    g = DiTImageGenerator(DiTImageConfig(**{**TINY.__dict__, "guidance_scale": 2.0}))
    g.model.load_state_dict(gen.model.state_dict())
    calls = []
    h = g.model.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0] if a else None))
    try:
        out = _grid(g)
    finally:
        h.remove()
    assert len(calls) == K and out.shape == (4, 1, 8, 8)
    assert not torch.equal(out, _grid(gen))


def test_save_load_round_trip_and_sha256_check(gen, tmp_path):
    save_dit_image(gen, tmp_path, {"steps": 0})
    loaded = load_dit_image(tmp_path, num_inference_steps=K)
    assert torch.equal(_grid(loaded), _grid(gen))
    with pytest.raises(ValueError, match="cannot be overridden"):
        load_dit_image(tmp_path, num_layers=3)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_layers": 3}))
    with pytest.raises(ValueError, match="config.json does not match the sha256"):
        load_dit_image(tmp_path)
    save_dit_image(gen, tmp_path)
    with open(tmp_path / "model.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="model.safetensors does not match the sha256"):
        load_dit_image(tmp_path)


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

    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    files = save_classifier(DigitClassifier(ClassifierConfig(image_size=8)).eval(), ckpt)
    save_dit_image(gen, ckpt, {"steps": 0}, extra_files=tuple(files))
    cfg = compose_cfg("backend=dit_image", "cache=bac", "cache.n_updates=2", f"backend.checkpoint={ckpt}",
                      f"backend.num_inference_steps={K}", "backend.n_calibration=2", "generate.n_per_class=2",
                      "generate.timing_rounds=1", config_name="generate")
    summary = generate(cfg, tmp_path / "out")
    assert (tmp_path / "out" / "grid.png").exists()
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    for key in ("speedup", "flops_ratio", "psnr_db", "ssim", "rel_l2", "latency_ms", "classifier"):
        assert key in saved, key
    assert saved["flops_ratio"] < 1 and summary["n_images"] == 20
    assert set(saved["classifier"]) == {"uncached", "cached", "fd_real_train"}
    assert (ckpt / "calibration" / f"DDIMScheduler_K{K}_n2.npz").exists()
