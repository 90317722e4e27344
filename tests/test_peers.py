"""The peers (eval/peers.py) on a tiny random DiTTransformer2DModel and LatteTransformer3DModel driven by a short DDIM
loop: every peer applies, samples and is removed without a trace (same instance attributes, submodules, state_dict
keys, bit-identical outputs); compute-everything settings give bit-identical samples; skipping settings compute
less and stay close; consecutive samples do not leak cache state; bad knobs and non-applicable peers raise."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

D = pytest.importorskip("diffusers")

from bac.engine import attach  # noqa: E402
from bac.sampling import denoise  # noqa: E402
from bac.wrapping import WrapperConflict  # noqa: E402
from eval.peers import CONFIGS, PEERS, NotApplicable, build_peer  # noqa: E402

K = 10  # DDIM steps: timesteps 900, 800, ..., 0


def _perturbed(model):
    # diffusers zero-inits adaLN-zero gates and output layers: perturb so that every block matters
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _build(kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if kind == "dit":
        model = _perturbed(D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                                   num_layers=3, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
        x0, labels = torch.randn(4, 1, 8, 8, generator=g), torch.arange(4)  # (B, C, H, W)

        def model_fn(x, t, k):
            return model(x, timestep=t.reshape(1).expand(len(x)), class_labels=labels, return_dict=False)[0][:, :1]
    else:
        model = _perturbed(D.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                     out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                     num_embeds_ada_norm=1000, cross_attention_dim=16,
                                                     caption_channels=12, video_length=2))
        x0, text = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 6, 12, generator=g)  # (B, C, F, H, W)

        def model_fn(x, t, k):
            return model(x, timestep=t.reshape(1), encoder_hidden_states=text, return_dict=False)[0][:, :4]

    def sample(steps=None):
        with torch.no_grad():
            return denoise(model_fn, D.DDIMScheduler(num_train_timesteps=1000), x0, steps or K)

    return model, sample


_MODELS: dict = {}


def tiny(kind):
    if kind not in _MODELS:
        model, sample = _build(kind)
        _MODELS[kind] = model, sample, sample()
    return _MODELS[kind]


def traces(model):
    """Every module's instance attributes, submodules and hook counts, and the state_dict keys."""
    return ([(n, sorted(vars(m)), sorted(m._modules), len(m._forward_pre_hooks), len(m._forward_hooks))
             for n, m in model.named_modules()], sorted(model.state_dict()),
            {c: sorted(vars(c)) for c in {type(m) for m in model.modules()}})


def run(kind, cfg):
    """Sample twice under the peer (each in its call_context); returns (first sample, its block fraction, peer)."""
    model, sample, _ = tiny(kind)
    peer = build_peer(cfg, model, calibrate=sample)
    peer.apply()
    try:
        with peer.call_context():
            out = sample(peer.num_inference_steps)
        fraction = peer.block_fraction()
        with peer.call_context():
            again = sample(peer.num_inference_steps)
    finally:
        peer.remove()
    assert torch.equal(out, again), "the second sample differs: cache state leaked between sampling calls"
    return out, fraction, peer


def _skip_cache_dit(cfg):
    if cfg["name"] == "cachedit_dbcache":
        pytest.importorskip("cache_dit")


# compute everything: bit-identical to no peer
EXACT = {
    "fewer_steps": {"num_inference_steps": K},
    "diffusers_fbcache": {"threshold": 0.0},
    "diffusers_taylorseer": {"cache_interval": 1},
    "diffusers_pab": {"spatial_attention_block_skip_range": 1, "temporal_attention_block_skip_range": 1,
                      "cross_attention_block_skip_range": 1},
    "diffusers_magcache": {"max_skip_steps": 0},
    "diffusers_fastercache": {"spatial_attention_block_skip_range": 1, "temporal_attention_block_skip_range": 1},
    "cachedit_dbcache": {"residual_diff_threshold": 0.0},
}
# skipping settings: compute less and stay within rel-L2 0.2 of the uncached sample. A tiny random model amplifies
# any change (FBCache skipping one of 10 steps moves it by 0.16), so the settings skip a little, late; fewer DDIM steps
# follow another timestep grid, which a random eps-predictor does not make close (9 of 10 steps: 0.9), so
# fewer_steps is only checked to run fewer steps.
SKIP = {
    "fewer_steps": {"num_inference_steps": K - 1},
    "diffusers_fbcache": {"threshold": 0.15},
    "diffusers_taylorseer": {"cache_interval": 2, "disable_cache_before_step": 6},
    "diffusers_pab": {"spatial_attention_block_skip_range": 2, "temporal_attention_block_skip_range": 2,
                      "cross_attention_block_skip_range": 2, **{f"{k}_attention_timestep_skip_range": [100, 500]
                                                                for k in ("spatial", "temporal", "cross")}},
    "diffusers_magcache": {"threshold": 0.1, "max_skip_steps": 1, "retention_ratio": 0.6},
    "diffusers_fastercache": {"spatial_attention_block_skip_range": 2, "temporal_attention_block_skip_range": 2,
                              "spatial_attention_timestep_skip_range": [-1, 400],
                              "temporal_attention_timestep_skip_range": [-1, 400]},
    "cachedit_dbcache": {"residual_diff_threshold": 0.15, "max_warmup_steps": 3},
}
ON_LATTE = ["fewer_steps", "diffusers_taylorseer", "diffusers_pab", "diffusers_fastercache"]
CASES = [("dit", n) for n in PEERS] + [("latte", n) for n in ON_LATTE]


def test_every_peer_has_a_hydra_config_with_its_defaults():
    root = Path(__file__).resolve().parents[1] / "configs" / "cache"
    for name, config in CONFIGS.items():
        yaml = OmegaConf.to_container(OmegaConf.load(root / f"{name}.yaml"), resolve=True)
        assert yaml == json.loads(json.dumps({"name": name, **asdict(config())})), name  # tuples as lists


def test_registry_lists_every_peer_and_refuses_unknown_names():
    assert set(EXACT) == set(SKIP) == set(PEERS)
    with pytest.raises(ValueError, match="known peers: .*diffusers_fbcache"):
        build_peer({"name": "teacache"}, tiny("dit")[0])


@pytest.mark.parametrize("kind,name", CASES)
def test_compute_everything_is_exact_and_remove_leaves_no_trace(kind, name):
    cfg = {"name": name, **EXACT[name]}
    _skip_cache_dit(cfg)
    model, sample, ref = tiny(kind)
    before = traces(model)
    out, fraction, _ = run(kind, cfg)
    assert torch.equal(out, ref)
    assert fraction == 1.0
    assert traces(model) == before
    assert torch.equal(sample(), ref)


@pytest.mark.parametrize("kind,name", CASES)
def test_skipping_computes_less_and_stays_close(kind, name):
    cfg = {"name": name, **SKIP[name]}
    _skip_cache_dit(cfg)
    model, sample, ref = tiny(kind)
    before = traces(model)
    out, fraction, peer = run(kind, cfg)
    steps = peer.num_inference_steps or K
    assert fraction * steps / K < 1
    assert not torch.equal(out, ref)
    if name != "fewer_steps":
        assert float((out - ref).norm() / ref.norm()) < 0.2
    assert traces(model) == before
    assert torch.equal(sample(), ref)


def test_magcache_calibrates_on_the_model_deterministically():
    model, sample, _ = tiny("dit")
    a = build_peer({"name": "diffusers_magcache"}, model, calibrate=sample)
    b = build_peer({"name": "diffusers_magcache"}, model, calibrate=sample)
    assert len(a.ratios) == K and a.ratios == b.ratios and a.ratios[0] == 1.0
    given = build_peer({"name": "diffusers_magcache", "mag_ratios": a.ratios}, model)  # no calibration
    assert given.ratios == a.ratios
    with pytest.raises(ValueError, match="needs mag_ratios or a calibrate callable"):
        build_peer({"name": "diffusers_magcache"}, model)


@pytest.mark.parametrize("name,why", [
    ("diffusers_fbcache", "FirstBlockCache adds 'last block output - first block output'"),
    ("diffusers_magcache", "MagCache adds 'last block output - first block input'"),
    ("cachedit_dbcache", "cache-dit 1.5.3 has no adapter"),
])
def test_residual_caches_do_not_apply_to_latte(name, why):
    _skip_cache_dit({"name": name})
    model = tiny("latte")[0]
    with pytest.raises(NotApplicable, match=f"cannot apply to LatteTransformer3DModel: {why}.*temporal_transformer"):
        build_peer({"name": name}, model, calibrate=tiny("latte")[1])


@pytest.mark.parametrize("cfg,match", [
    ({"name": "diffusers_pab", "spatial_attention_block_skip_range": None, "temporal_attention_block_skip_range": 2},
     "config matches no module of DiTTransformer2DModel"),  # DiT has no temporal attention
    ({"name": "diffusers_taylorseer", "cache_identifiers": ["^transformer_blocks.*attn"]},  # diffusers' default
     "config matches no module"),
])
def test_configs_that_match_nothing_are_refused(cfg, match):
    with pytest.raises(NotApplicable, match=match):
        build_peer(cfg, tiny("dit")[0])


@pytest.mark.parametrize("cfg,match", [
    ({"name": "fewer_steps", "num_inference_steps": 0}, "num_inference_steps must be an int >= 1, got 0"),
    ({"name": "fewer_steps", "steps": 10}, r"unknown knobs \['steps'\]; known: \['num_inference_steps'\]"),
    ({"name": "diffusers_fbcache", "threshold": -0.1}, "threshold must be >= 0"),
    ({"name": "diffusers_taylorseer", "cache_interval": 0}, "cache_interval must be an int >= 1"),
    ({"name": "diffusers_taylorseer", "taylor_factors_dtype": "int8"}, "taylor_factors_dtype must be one of"),
    ({"name": "diffusers_pab", "spatial_attention_block_skip_range": None}, "a block skip range must be set"),
    ({"name": "diffusers_pab", "spatial_attention_timestep_skip_range": [800, 100]}, "low < high, got \\[800, 100\\]"),
    ({"name": "diffusers_taylorseer", "cache_interval": 2.5}, "cache_interval must be an int >= 1, got 2.5"),
    ({"name": "diffusers_magcache", "retention_ratio": 1.5}, r"retention_ratio must be in \[0, 1\]"),
    ({"name": "diffusers_fastercache", "spatial_attention_block_skip_range": 0}, "must be an int >= 1, got 0"),
    ({"name": "cachedit_dbcache", "residual_diff_threshold": -1}, "residual_diff_threshold must be >= 0"),
    ({"name": "cachedit_dbcache", "Fn_compute_blocks": 3, "Bn_compute_blocks": 1}, "<= the model's 3 blocks"),
])
def test_bad_knobs_are_refused_with_what_was_given(cfg, match):
    _skip_cache_dit(cfg)
    with pytest.raises(ValueError, match=match):
        build_peer(cfg, tiny("dit")[0], calibrate=tiny("dit")[1])


def test_fastercache_refuses_a_range_that_holds_the_first_step():
    model, sample, _ = tiny("dit")
    peer = build_peer({"name": "diffusers_fastercache", "spatial_attention_timestep_skip_range": [-1, 1000]}, model)
    peer.apply()
    try:
        with pytest.raises(ValueError, match="first step's timestep 900.0 lies in"), peer.call_context():
            sample()
    finally:
        peer.remove()


@pytest.mark.parametrize("name", ["diffusers_taylorseer", "diffusers_pab"])  # they hook attn1/ff, the engine's blocks
def test_engine_and_peer_refuse_each_other(name):
    model = tiny("dit")[0]
    peer = build_peer({"name": name}, model)
    peer.apply()
    try:
        with pytest.raises(WrapperConflict, match="carries diffusers hooks"):
            attach(model)
    finally:
        peer.remove()
    engine = attach(model)
    try:
        with pytest.raises(RuntimeError, match="a bac engine is attached"):
            peer.apply()
    finally:
        engine.detach()
    peer.apply()
    peer.remove()


@pytest.mark.parametrize("kind,overrides", [
    ("image", ["cache=fewer_steps", "cache.num_inference_steps=3"]),
    ("image", ["cache=diffusers_magcache"]),  # calibrates on generate's calibrate callable
    ("video", ["cache=diffusers_pab", "cache.temporal_attention_block_skip_range=2"]),
])
def test_generate_runs_a_peer_in_place_of_the_engine(kind, overrides, tmp_path):
    pytest.importorskip("sklearn")
    from backends.digit_classifier import ClassifierConfig, DigitClassifier, save_classifier
    from backends.dit_image import DiTImageConfig, DiTImageGenerator, save_dit_image
    from backends.dit_video import DiTVideoConfig, DiTVideoGenerator, save_dit_video
    from eval.generate import generate
    from tests.conftest import compose_cfg

    torch.manual_seed(0)
    small = dict(patch_size=2, num_layers=2, num_heads=2, head_dim=8, num_inference_steps=6)
    if kind == "image":
        gen, save = DiTImageGenerator(DiTImageConfig(image_size=8, **small)), save_dit_image
    else:
        gen = DiTVideoGenerator(DiTVideoConfig(frames=3, canvas=8, digit=4, caption_dim=8, **small))
        save = save_dit_video
    _perturbed(gen.model)
    ckpt = tmp_path / "ckpt"
    files = save_classifier(DigitClassifier(ClassifierConfig(image_size=gen.sample_shape[-1])).eval(), ckpt)
    save(gen, ckpt, {"steps": 0}, extra_files=tuple(files))
    cfg = compose_cfg(f"backend=dit_{kind}", *overrides, f"backend.checkpoint={ckpt}", "backend.num_inference_steps=6",
                      "backend.timing_batches=[1]", "generate.n_per_class=1", "generate.timing_rounds=1",
                      config_name="generate")
    summary = generate(cfg, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "engine" not in saved and set(saved["speedup"]) == {"1"} and summary["n_samples"] == 10
    steps = saved["peer"]["num_inference_steps"]
    assert saved["flops_ratio"] == pytest.approx(saved["peer"]["block_fraction"] * steps / 6)
    if overrides[0] == "cache=fewer_steps":
        assert steps == 3 and saved["flops_ratio"] == 0.5 and saved["psnr_db"] < 100
    if overrides[0] == "cache=diffusers_magcache":
        assert len(saved["peer"]["mag_ratios"]) == 6


@pytest.mark.parametrize("name", ["diffusers_fbcache", "diffusers_taylorseer"])
def test_timed_application_carries_no_counting_hooks(name):
    """generate.py times a peer applied with count=False, like the engine's timed runs: same samples, no counters."""
    cfg = {"name": name, **SKIP[name]}
    model, sample, _ = tiny("dit")
    out, _, _ = run("dit", cfg)
    peer = build_peer(cfg, model, calibrate=sample)
    peer.apply(count=False)
    try:
        leaves = [leaf for leaf, _ in peer._units]
        assert not any(leaf._forward_pre_hooks for leaf in leaves)
        with peer.call_context():
            assert torch.equal(sample(peer.num_inference_steps), out)
        assert peer.block_fraction() is None
    finally:
        peer.remove()
