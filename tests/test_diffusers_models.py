"""The cache engine on tiny random-init instances of nine diffusers transformer classes (built offline, no
downloads): blocks found by the default patterns, compute-everything bit-exact, detach exact, every method runs,
execution order measured on two-stack models, one cache per model call within a step (CFG as two calls), and
no crash or lost hook beside diffusers' own caching hooks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from bac import profiling  # noqa: E402
from bac.blocks import BlockSpec  # noqa: E402
from bac.calibration import calibrate  # noqa: E402
from bac.engine import attach, fingerprint  # noqa: E402
from bac.forecasters import Taylor  # noqa: E402
from bac.methods import CACHE_METHODS, CacheContext, build_cache, defaults  # noqa: E402
from bac.protocol import Signature  # noqa: E402
from bac.sampling import denoise  # noqa: E402
from bac.schedule import compute_all, uniform  # noqa: E402
from bac.strategies import FBCache, MaskForecast  # noqa: E402
from bac.wrapping import WrapperConflict  # noqa: E402

K = 6  # denoising steps
D = diffusers


def _build(name):
    """(model, x, kwargs without timestep, timestep scale): a tiny instance of each class and its inputs."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    text = dict(encoder_hidden_states=r(1, 6, 12))
    make = {
        "dit": lambda: (D.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=2,
                                                sample_size=8, patch_size=2, num_embeds_ada_norm=10),
                        r(1, 4, 8, 8), dict(class_labels=torch.zeros(1, dtype=torch.long))),
        "pixart": lambda: (D.PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                      out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                      cross_attention_dim=16, caption_channels=12),
                           r(1, 4, 8, 8), dict(text, added_cond_kwargs={"resolution": None, "aspect_ratio": None})),
        "sd3": lambda: (D.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
                                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                                caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
                                                pos_embed_max_size=16),
                        r(1, 4, 8, 8), dict(text, pooled_projections=r(1, 10))),
        "flux": lambda: (D.FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=2,
                                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                                  pooled_projection_dim=10, axes_dims_rope=(2, 2, 4)),
                         r(1, 16, 8), dict(text, pooled_projections=r(1, 10), img_ids=torch.zeros(16, 3),
                                           txt_ids=torch.zeros(6, 3))),
        "cogvideox": lambda: (D.CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                            out_channels=4, time_embed_dim=8, text_embed_dim=12,
                                                            num_layers=2, sample_width=8, sample_height=8,
                                                            sample_frames=5, patch_size=2, temporal_compression_ratio=4,
                                                            max_text_seq_length=6),
                              r(1, 2, 4, 8, 8), dict(text)),
        "latte": lambda: (D.LatteTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                    out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                    num_embeds_ada_norm=1000, cross_attention_dim=16,
                                                    caption_channels=12, video_length=2),
                          r(1, 4, 2, 8, 8), dict(text)),
        "wan": lambda: (D.WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8,
                                                in_channels=4, out_channels=4, text_dim=12, freq_dim=16, ffn_dim=32,
                                                num_layers=2, rope_max_seq_len=32),
                        r(1, 4, 2, 8, 8), dict(text)),
        "hunyuan": lambda: (D.HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                             attention_head_dim=8, num_layers=1, num_single_layers=1,
                                                             num_refiner_layers=1, mlp_ratio=2.0, patch_size=1,
                                                             patch_size_t=1, text_embed_dim=12,
                                                             pooled_projection_dim=10, rope_axes_dim=(2, 2, 4),
                                                             guidance_embeds=False),
                            r(1, 4, 1, 4, 4), dict(text, encoder_attention_mask=torch.ones(1, 6),
                                                   pooled_projections=r(1, 10))),
        "ltx": lambda: (D.LTXVideoTransformer3DModel(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1,
                                                     num_attention_heads=2, attention_head_dim=8,
                                                     cross_attention_dim=16, num_layers=2, caption_channels=12),
                        r(1, 16, 8), dict(text, encoder_attention_mask=torch.ones(1, 6), num_frames=1, height=4,
                                          width=4)),
    }[name]
    torch.manual_seed(0)
    model, x, kw = make()
    return model.eval(), x, kw, (1 / 1000 if name == "flux" else 1)


MODELS = ["dit", "pixart", "sd3", "flux", "cogvideox", "latte", "wan", "hunyuan", "ltx"]
N_BLOCKS = {"dit": 4, "pixart": 6, "sd3": 5, "flux": 5, "cogvideox": 4, "latte": 10, "wan": 6, "hunyuan": 4, "ltx": 6}
_CACHE: dict = {}


def tiny(name):
    if name not in _CACHE:
        _CACHE[name] = _build(name)
    return _CACHE[name]


def sample(name, cursor=None, x=None, **extra):
    """K DDIM steps of the model's own prediction (the leading channels of its output)."""
    model, x0, kw, scale = tiny(name)
    x = x0 if x is None else x

    def model_fn(x, t, k):
        out = model(x, timestep=t.reshape(1) * scale, return_dict=False, **kw, **extra)[0]
        return out[:, : x.shape[1]]

    with torch.no_grad():
        return denoise(model_fn, D.DDIMScheduler(num_train_timesteps=1000), x, K, cursor=cursor)


def run(name, cache=None, blocks=None):
    model = tiny(name)[0]
    engine = attach(model, cache, blocks=blocks)
    try:
        return sample(name, engine), engine
    finally:
        engine.detach()


def leftovers(model):
    """Names of modules that still carry an instance attribute set by some wrapper."""
    return sorted(n for n, m in model.named_modules()
                  if any(callable(v) and getattr(v, "__bac_engine__", None) is not None for v in vars(m).values())
                  or ("forward" in vars(m) and getattr(vars(m)["forward"], "__func__", None) is not type(m).forward))


# ---------------------------------------------------------------------------------------------------- discovery
@pytest.mark.parametrize("name", MODELS)
def test_blocks_found_compute_everything_exact_and_detach_exact(name):
    model = tiny(name)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = leftovers(model)
    reference = sample(name)
    out, engine = run(name)  # no schedule: every block every step
    assert len(engine.blocks) == N_BLOCKS[name]
    assert torch.equal(out, reference)
    assert engine.computed.sum() == N_BLOCKS[name] * K and engine.reused.sum() == 0
    out, engine = run(name, compute_all([b.name for b in engine.blocks], K))  # the mask path, storing every value
    assert torch.equal(out, reference)
    assert leftovers(model) == before == []
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(sample(name), reference)


# ---------------------------------------------------------------------------------------------------- every method
class Target:
    """A tiny diffusers model as a ``bac.protocol.CacheTarget`` (what a DiT backend offers the cache methods)."""

    def __init__(self, name):
        self.name = name

    def cache_model(self):
        return tiny(self.name)[0]

    def cache_signature(self):
        return Signature("DDIMScheduler", K, fingerprint(self.cache_model()))

    def cache_call(self):
        model, x, kw, scale = tiny(self.name)
        return lambda: model(x, timestep=torch.tensor([500.0]) * scale, return_dict=False, **kw)

    def cache_sample(self, cursor, n, seed):
        """n inputs: the model's inputs repeated n times, with fresh latents from ``seed``."""
        model, x, kw, scale = tiny(self.name)
        x = torch.randn((n, *x.shape[1:]), generator=torch.Generator().manual_seed(seed))
        kw = {k: v.expand(n, *v.shape[1:]) if torch.is_tensor(v) and v.shape[:1] == (1,) else v for k, v in kw.items()}

        def model_fn(x, t, k):
            return model(x, timestep=t.reshape(1).expand(n) * scale, return_dict=False, **kw)[0][:, : x.shape[1]]

        with torch.no_grad():
            denoise(model_fn, D.DDIMScheduler(num_train_timesteps=1000), x, K, cursor=cursor)


EVERYTHING = {"none": {}, "uniform": {"n_updates": K}, "unified_acs": {"n_updates": K}, "blockwise_acs": {"n_updates": K},
              "bac": {"n_updates": K}, "fora": {"interval": 1}, "delta_dit": {"n_cached_layers": 0},
              "profiling": {"interval": 1, "warmup": 1}, "ertacache": {"n_updates": K, "n_obs": 2},
              "teacache": {"delta": 0.0, "n_obs": 2}, "fbcache": {"threshold": 0.0}, "bwcache": {"threshold": 0.0},
              "toca": {"interval": 1}, "taylorseer": {"interval": 1}, "foca": {"interval": 1}, "abcache": {"interval": 1},
              "hyca": {"interval": 1, "n_obs": 2, "n_groups": 2}, "bac_forecast": {"n_updates": K, "n_bubble": 1}}
SKIPPING = {"uniform": {"n_updates": 3}, "unified_acs": {"n_updates": 3}, "blockwise_acs": {"n_updates": 3},
            "bac": {"n_updates": 3}, "fora": {"interval": 2}, "delta_dit": {"n_cached_layers": 1, "interval": 2},
            "profiling": {"n_always": 1, "interval": 2, "warmup": 1}, "ertacache": {"n_updates": 3, "n_obs": 2},
            "teacache": {"delta": 1e9, "n_obs": 2}, "fbcache": {"threshold": 10.0},
            "bwcache": {"threshold": 10.0, "max_reuse": 2}, "toca": {"interval": 2, "ratio": 0.5},
            "taylorseer": {"interval": 2}, "foca": {"interval": 2}, "abcache": {"interval": 2},
            "hyca": {"interval": 2, "n_obs": 2, "n_groups": 2}, "bac_forecast": {"n_updates": 3, "n_bubble": 1}}


@pytest.mark.parametrize("name", MODELS)
def test_every_method_is_exact_computing_everything_and_skips_otherwise(name):
    """Every registered method, built through bac.methods from the model's CacheTarget (its calibration made
    on the spot by bac.calibration): exact when told to compute everything, reusing otherwise."""
    assert set(EVERYTHING) == set(CACHE_METHODS) and set(SKIPPING) == set(CACHE_METHODS) - {"none"}
    reference = sample(name)
    ctx = CacheContext(Target(name), calibration_inputs=2)
    for method, knobs in EVERYTHING.items():
        out, engine = run(name, build_cache(ctx, {**defaults(method), **knobs}))
        assert torch.equal(out, reference), method
        assert engine.reused.sum() == 0, method
    for method, knobs in SKIPPING.items():
        out, engine = run(name, build_cache(ctx, {**defaults(method), **knobs}))
        assert out.shape == reference.shape and torch.isfinite(out).all(), method
        assert engine.reused.sum() > 0, f"{method} reused nothing on {name}"


def test_calibration_streams_when_the_features_do_not_fit():
    """A budget below one run's features: the run is repeated per window of steps, the sums are the same."""
    target = Target("latte")
    whole = calibrate(target, 2)
    streamed = calibrate(target, 2, max_bytes=30_000)  # about one step of all blocks' features
    assert [b.name for b in streamed.blocks] == [b.name for b in whole.blocks]
    for m in whole.sims:
        np.testing.assert_allclose(streamed.sims[m], whole.sims[m], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(streamed.errors, whole.errors, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- order and depth
def test_flux_runs_double_stream_then_single_stream_blocks():
    model = tiny("flux")[0]
    engine = attach(model)
    blocks = engine.trace(lambda: sample("flux"))  # the first call shows the order
    engine.detach()
    assert [(b.name, b.layer, b.kind) for b in blocks] == [
        ("transformer_blocks.0.attn", 0, "attn"), ("transformer_blocks.0.ff", 0, "ffn"),
        ("transformer_blocks.0.ff_context", 0, "ffn"), ("single_transformer_blocks.0", 1, "block"),
        ("single_transformer_blocks.1", 2, "block")]
    fb = FBCache(10.0)
    _, engine = run("flux", fb)
    assert [engine.blocks[i].name for i in fb.first] == ["transformer_blocks.0.attn", "transformer_blocks.0.ff",
                                                       "transformer_blocks.0.ff_context"]
    assert engine.reused[3:, 1:].sum() > 0 and engine.reused[:3].sum() == 0  # only the first layer always runs


def test_latte_interleaves_spatial_and_temporal_blocks():
    _, engine = run("latte")
    assert [(b.name, b.layer) for b in engine.blocks] == [
        ("transformer_blocks.0.attn1", 0), ("transformer_blocks.0.attn2", 0), ("transformer_blocks.0.ff", 0),
        ("temporal_transformer_blocks.0.attn1", 1), ("temporal_transformer_blocks.0.ff", 1),
        ("transformer_blocks.1.attn1", 2), ("transformer_blocks.1.attn2", 2), ("transformer_blocks.1.ff", 2),
        ("temporal_transformer_blocks.1.attn1", 3), ("temporal_transformer_blocks.1.ff", 3)]
    # Δ-DiT caches the rear layer early and the front layer late: the last and first to run, not by name
    m = profiling.delta_dit_schedule(engine.blocks, K, 2, 1).to_mask()
    assert [b.name for b, row in zip(engine.blocks, m) if not row[: K // 2].all()] == [
        "temporal_transformer_blocks.1.attn1", "temporal_transformer_blocks.1.ff"]
    assert [b.name for b, row in zip(engine.blocks, m) if not row[K // 2:].all()] == [
        "transformer_blocks.0.attn1", "transformer_blocks.0.attn2", "transformer_blocks.0.ff"]


@pytest.mark.parametrize("method", ["fbcache", "bwcache", "teacache", "toca"])
def test_strategies_do_not_depend_on_when_the_order_became_known(method):
    """Latte's blocks are re-indexed on the first call: a strategy that first runs in that call (its first step
    replayed after the order is known) acts exactly as on an engine that was traced before."""
    target = Target("latte")
    cfg = {**defaults(method), **SKIPPING[method], **({"threshold": 0.5} if method in ("fbcache", "bwcache") else {}),
           **({"delta": 0.5} if method == "teacache" else {})}
    outs = []
    for traced in (False, True):
        strategy = build_cache(CacheContext(target, 2), cfg)  # (a fit records on an engine of its own)
        engine = attach(target.cache_model())
        if traced:  # the order known before the strategy is bound
            engine.trace(target.cache_call())
        engine.set_schedule(strategy)
        outs.append((sample("latte", engine), engine.computed.copy()))
        engine.detach()
    assert torch.equal(outs[0][0], outs[1][0]) and np.array_equal(outs[0][1], outs[1][1])
    assert 0 < outs[0][1].sum() < outs[0][1].size  # it did skip, and not everything


# ---------------------------------------------------------------------------------------------------- CFG
@pytest.mark.parametrize("name,cache", [(m, "uniform") for m in MODELS] + [("sd3", "fbcache"), ("latte", "taylorseer")])
def test_cfg_as_two_calls_keeps_one_cache_per_call(name, cache):
    """Conditional then unconditional call at every step: each call gets the values its own branch computed, so
    each branch's outputs are bitwise those of that branch run alone under the same cache."""
    model, x, kw, scale = tiny(name)
    probe = attach(model)
    names = [b.name for b in probe.trace(lambda: sample(name))]
    probe.detach()
    make = {"uniform": lambda: uniform(names, K, 2), "fbcache": lambda: FBCache(10.0),
            "taylorseer": lambda: MaskForecast(profiling.interval_schedule(names, K, 2), Taylor(1))}[cache]
    key = "class_labels" if name == "dit" else "encoder_hidden_states"  # the condition; "unconditional": another
    text, null = kw[key], (kw[key] + 1 if name == "dit" else torch.zeros_like(kw[key]))
    xs = [x + 0.1 * k for k in range(K)]  # fixed inputs: the calls' outputs do not feed each other

    def calls(engine, conds):
        outs = []
        with torch.no_grad(), engine.session(K):
            for k in range(K):
                engine.step(k)
                for c in conds:
                    extra = dict(kw, **{key: c})
                    outs.append(model(xs[k], timestep=torch.tensor([900 - 100 * k]) * scale, return_dict=False,
                                      **extra)[0])
        return outs

    runs = {}
    for conds in ([text], [null], [text, null]):
        engine = attach(model, make())
        runs[len(runs)] = (calls(engine, conds), engine.reused.sum())
        engine.detach()
    alone_c, alone_u, (both, reused) = runs[0][0], runs[1][0], runs[2]
    assert reused > 0 and not torch.equal(alone_c[-1], alone_u[-1])  # it reused, and the branches differ
    assert all(torch.equal(a, b) for a, b in zip(alone_c, both[0::2]))
    assert all(torch.equal(a, b) for a, b in zip(alone_u, both[1::2]))


# ---------------------------------------------------------------------------------------------------- other wrappers
def test_beside_diffusers_first_block_cache_hooks():
    from diffusers.hooks import FirstBlockCacheConfig

    model = tiny("flux")[0]
    reference = sample("flux")
    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))
    hooked = {n: vars(m)["forward"] for n, m in model.named_modules() if "forward" in vars(m)}
    assert hooked  # diffusers rewrote the blocks' forwards
    with pytest.raises(WrapperConflict, match="single_transformer_blocks.0 carries diffusers hooks"):
        attach(model)  # a unit on a hooked block: refused, nothing installed
    assert {n: vars(m)["forward"] for n, m in model.named_modules() if "forward" in vars(m)} == hooked
    engine = attach(model, blocks="transformer_blocks.*.{attn,ff,ff_context}")  # branches inside hooked blocks
    with model.cache_context("cond"):
        out = sample("flux", engine)
    assert out.shape == reference.shape and engine.computed.sum() > 0
    engine.detach()
    assert {n: vars(m)["forward"] for n, m in model.named_modules() if "forward" in vars(m)} == hooked  # theirs stay
    model.disable_cache()  # leaves the blocks' own forwards set on the instances
    leftover = {n: vars(m)["forward"] for n, m in model.named_modules() if "forward" in vars(m)}
    out, engine = run("flux")
    assert torch.equal(out, reference)
    assert {n: vars(m)["forward"] for n, m in model.named_modules() if "forward" in vars(m)} == leftover
    assert torch.equal(sample("flux"), reference)


FF = r"(transformer_blocks|temporal_transformer_blocks|blocks)\.\d+\.(ff|ffn)"  # diffusers' TaylorSeer on the FFNs
NOT_FF = ["transformer_blocks.*.{attn1,attn2,attn,ff_context}", "temporal_transformer_blocks.*.{attn1,attn2}",
          "blocks.*.{attn1,attn2}", BlockSpec("single_transformer_blocks.*", "block")]


def in_hook_chains(model) -> bool:
    """Whether an engine's wrapper is still a link of some diffusers hook chain."""
    return any(getattr(ref.forward, "__bac_engine__", None) or getattr(ref.original_forward, "__bac_engine__", None)
               for m in model.modules() if hasattr(m, "_diffusers_hook") for ref in m._diffusers_hook._fn_refs)


def forwards(model):
    return {n: vars(m)["forward"] for n, m in model.named_modules() if "forward" in vars(m)}


@pytest.mark.parametrize("name", MODELS)
def test_beside_diffusers_taylorseer_hooks(name):
    """diffusers' TaylorSeer hooks on the FFNs: attaching to them is refused with nothing set, attaching beside
    them works and leaves them in place, after their removal the engine attaches exactly, and hooks set on top
    of the engine survive its detach."""
    from diffusers.hooks import HookRegistry, TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.models.cache_utils import CacheMixin

    def hook():
        apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1,
                                                            taylor_factors_dtype=torch.float32, cache_identifiers=[FF]))

    def unhook():
        HookRegistry.check_if_exists_or_initialize(model).remove_hook("taylorseer_cache", recurse=True)

    model = tiny(name)[0]
    reference = sample(name)
    hook()
    hooked = forwards(model)
    with pytest.raises(WrapperConflict, match=r"\.ffn? carries diffusers hooks \['taylorseer_cache'\]"):
        attach(model)
    assert forwards(model) == hooked
    engine = attach(model, blocks=NOT_FF)
    with CacheMixin.cache_context(model, "cond"):
        assert torch.isfinite(sample(name, engine)).all()
    engine.detach()
    assert forwards(model) == hooked
    unhook()
    leftover = forwards(model)  # diffusers leaves each FFN's own forward set on the instance
    out, engine = run(name)
    assert torch.equal(out, reference) and forwards(model) == leftover
    engine = attach(model)
    hook()  # on top of the engine's wrappers
    engine.detach()
    assert not in_hook_chains(model)
    with CacheMixin.cache_context(model, "cond"):
        assert torch.isfinite(sample(name)).all()  # their hooks still run, without the engine inside
    unhook()
    assert leftovers(model) == [] and torch.equal(sample(name), reference)


def test_detach_keeps_hooks_set_after_the_engine():
    from diffusers.hooks import FirstBlockCacheConfig

    model = tiny("flux")[0]
    reference = sample("flux")
    engine = attach(model)  # wraps the single-stream blocks as units
    model.enable_cache(FirstBlockCacheConfig(threshold=0.05))  # diffusers wraps the engine's wrappers
    engine.detach()  # takes its link out of diffusers' chain; diffusers' hooks stay and still run
    assert leftovers(model) != [] and not in_hook_chains(model)
    with model.cache_context("cond"):
        assert sample("flux").shape == reference.shape
    model.disable_cache()
    assert leftovers(model) == []  # no wrapper of anyone is left
    assert torch.equal(sample("flux"), reference)


def test_a_second_engine_or_a_hand_set_forward_is_refused():
    model = tiny("dit")[0]
    engine = attach(model)
    with pytest.raises(WrapperConflict, match="already wrapped by another bac engine"):
        attach(model)
    engine.detach()
    ff = model.transformer_blocks[0].ff
    ff.forward = lambda x: x
    try:
        with pytest.raises(WrapperConflict, match="transformer_blocks.0.ff.forward is already replaced"):
            attach(model)
    finally:
        del ff.forward
    assert leftovers(model) == []


# ---------------------------------------------------------------------------------------------------- declarations
def test_gated_layers_cannot_be_fused():
    model = tiny("dit")[0]
    names = [f"transformer_blocks.{i}.{a}" for i in range(2) for a in ("attn1", "ff")]
    engine = attach(model, uniform(names, K, 2), layers="transformer_blocks.*")
    with pytest.raises(ValueError, match="gated or scaled outside those blocks"):
        sample("dit", engine)
    engine.detach()
    assert leftovers(model) == []


def test_unknown_attributes_take_a_declared_kind_and_units_keep_their_structure():
    model = tiny("flux")[0]
    with pytest.raises(ValueError, match="cannot tell the kind of block single_transformer_blocks.0.proj_mlp"):
        attach(model, blocks="single_transformer_blocks.*.proj_mlp")
    blocks = [{"single_transformer_blocks.*.proj_mlp": "ffn"}, "single_transformer_blocks.*.attn"]
    out, engine = run("flux", blocks=blocks)
    assert torch.equal(out, sample("flux")) and [b.kind for b in engine.blocks] == ["ffn", "attn"] * 2
    names = ["transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
             "single_transformer_blocks.0", "single_transformer_blocks.1"]
    declared = ["transformer_blocks.*.{attn,ff,ff_context}",
                BlockSpec("single_transformer_blocks.*", "block", streams=("encoder_hidden_states", "hidden_states"))]
    a, _ = run("flux", uniform(names, K, 2))
    b, _ = run("flux", uniform(names, K, 2), blocks=declared)
    assert torch.equal(a, b) and not torch.equal(a, sample("flux"))


def test_a_declared_input_the_block_does_not_take_is_refused_without_a_trace():
    model = tiny("ltx")[0]
    with pytest.raises(ValueError, match=r"transformer_blocks.0.ff has no parameter 'x' \(BlockSpec.input\)"):
        attach(model, blocks=["transformer_blocks.*.attn1", BlockSpec("transformer_blocks.*.ff", input="x")])
    assert leftovers(model) == []
    _, engine = run("ltx", blocks=["transformer_blocks.*.attn1",
                                   BlockSpec("transformer_blocks.*.ff", input="hidden_states")])
    assert len(engine.blocks) == 4


def test_a_unit_with_two_same_shaped_inputs_must_declare_its_streams():
    class Unit(torch.nn.Module):
        def forward(self, a, b):
            return b + a.mean(), a + 1.0  # continues (b, a)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.units = torch.nn.ModuleList([Unit()])

        def forward(self, a, b):
            for u in self.units:
                b, a = u(a, b)
            return a + b

    net, a, b = Net(), torch.randn(2, 3), torch.randn(2, 3)
    engine = attach(net, blocks=BlockSpec("units.*", "block"))
    with pytest.raises(ValueError, match=r"cannot tell which argument its output tensor 0 .* streams="):
        net(a, b)
    engine.detach()
    engine = attach(net, uniform(["units.0"], 2, 1), blocks=BlockSpec("units.*", "block", streams=("b", "a")))
    with engine.session(2):
        engine.step(0)
        net(a, b)
        engine.step(1)
        out = net(a + 1, b)  # reused: each stream plus its residual from step 0
    engine.detach()
    assert torch.allclose(out, (b + a.mean()) + (a + 2.0))


def test_fingerprint_takes_any_dtype_and_is_kept_per_model():
    model = _build("dit")[0].to(torch.bfloat16)
    fp = fingerprint(model)
    assert fp == fingerprint(model) and len(fp) == 16
    with torch.no_grad():
        model.proj_out_2.bias.add_(1)
    assert fingerprint(model) != fp
    assert fingerprint(model.float()) != fp  # float32 bytes differ from bf16 bytes
