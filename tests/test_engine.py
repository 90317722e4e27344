"""The cache engine: exactness, leaving no trace, no state across calls, sessions, block discovery."""
from __future__ import annotations

import pytest
import torch

import numpy as np

import bac.engine
from bac.engine import attach, find_blocks
from policies import DiffusionTransformerPolicy, DPTConfig, Normalizer


def make_policy(seed=0, **kw) -> DiffusionTransformerPolicy:
    torch.manual_seed(seed)
    kw = {"num_train_timesteps": 20, "num_inference_steps": 20} | kw
    cfg = DPTConfig(obs_keys=["o"], obs_dims=[5], action_dim=3, horizon=8, n_obs_steps=2, n_action_steps=4,
                    n_layer=3, n_emb=32, **kw)
    rng = np.random.default_rng(seed)
    norm = Normalizer.fit({"obs": rng.normal(size=(40, 5)), "action": rng.normal(size=(40, 3))})
    return DiffusionTransformerPolicy(cfg, norm).eval()


def obs(seed=0, B=2):
    return {"o": torch.randn(B, 2, 5, generator=torch.Generator().manual_seed(seed))}


def act(policy, o, seed=0):
    """Actions on the policy's device (the noise is drawn there, so a CUDA policy can be checked the same way)."""
    gen = torch.Generator(policy.device).manual_seed(seed)
    return policy.predict_action({k: v.to(policy.device) for k, v in o.items()}, generator=gen)["action"]


def test_blocks_found_in_layer_order():
    policy = make_policy()
    names = [b.name for b in attach(policy.model).blocks]
    assert names[:3] == ["decoder.layers.0.sa_block", "decoder.layers.0.ca_block", "decoder.layers.0.ff_block"]
    assert len(names) == 9
    assert [b.kind for _, _, b in find_blocks(make_policy().model)][:3] == ["attn", "cross_attn", "ffn"]


def test_no_blocks_lists_candidates():
    with pytest.raises(ValueError, match=r"no blocks match .*module lists in this model: \['decoder.layers', 'encoder'\]"):
        attach(make_policy().model, blocks="decoder.layers.*.nonexistent")


def check_compute_all_and_detach(policy):
    """No schedule: bit-identical actions; detach restores every module and weight. Shared with test_cuda."""
    before_state = {k: v.clone() for k, v in policy.state_dict().items()}
    reference = act(policy, obs())
    engine = attach(policy.model)  # no schedule: every block every step
    policy.step_cursor = engine
    assert torch.equal(act(policy, obs()), reference)
    assert engine.computed.sum() == 9 * 20 and engine.reused.sum() == 0
    engine.detach()
    policy.step_cursor = None
    for layer in policy.model.decoder.layers:
        assert not {"sa_block", "ca_block", "ff_block", "forward"} & set(vars(layer))
        assert layer.ff_block.__func__ is type(layer).ff_block
    assert "forward" not in vars(policy.model.decoder)  # the stack wrapper is gone too
    assert all(torch.equal(before_state[k], v) for k, v in policy.state_dict().items())
    assert torch.equal(act(policy, obs()), reference)


def test_compute_all_is_bitwise_identical_and_detach_leaves_no_trace():
    check_compute_all_and_detach(make_policy())


def test_session_is_cleared_after_an_exception():
    policy = make_policy()
    engine = attach(policy.model)
    policy.step_cursor = engine
    real_forward = policy.model.head.forward
    policy.model.head.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        act(policy, obs())
    assert engine._session is None
    policy.model.head.forward = real_forward
    del policy.model.head.forward
    act(policy, obs())  # a new session opens cleanly


def test_step_outside_session_and_double_attach_fail():
    policy = make_policy()
    engine = attach(policy.model)
    with pytest.raises(RuntimeError, match="outside engine.session"):
        engine.step(0)
    with pytest.raises(RuntimeError, match="already wrapped"):
        attach(policy.model)
    engine.detach()
    attach(policy.model).detach()


def test_flop_profile_counts_blocks():
    policy = make_policy()
    engine = attach(policy.model)
    x, o = torch.randn(1, 8, 3), torch.randn(1, 2, 5)
    prof = engine.profile_flops(lambda: policy.model(x, 3, o))
    assert prof["total"] > sum(prof["blocks"]) > 0
    assert prof["by_kind"]["ffn"] > prof["by_kind"]["attn"] > prof["by_kind"]["cross_attn"] > 0
    assert engine.flops_ratio() == pytest.approx(1.0)


def test_fingerprint_changes_with_weights():
    policy = make_policy()
    fp = bac.engine.fingerprint(policy.model)
    assert fp == bac.engine.fingerprint(policy.model) and len(fp) == 16
    with torch.no_grad():
        policy.model.head.bias.add_(1e-3)
    assert bac.engine.fingerprint(policy.model) != fp


def cached_policy(method="uniform"):
    from policies.cache_target import enable_cache, make_schedule

    policy = make_policy()
    engine = enable_cache(policy, make_schedule(policy, "unused", method, n_updates=4))
    return policy, engine


def test_compute_all_schedule_through_enable_cache_is_exact():
    from bac.schedule import compute_all
    from policies.cache_target import enable_cache, policy_signature

    policy = make_policy()
    reference = act(policy, obs())
    scheduler, K, model_hash = policy_signature(policy)
    blocks = [info.name for _, _, info in find_blocks(policy.model)]
    engine = enable_cache(policy, compute_all(blocks, K, scheduler=scheduler, model_hash=model_hash))
    assert torch.equal(act(policy, obs()), reference)
    assert engine.reused.sum() == 0 and engine.flops_ratio() == pytest.approx(1.0)


def test_uniform_cache_really_reuses_and_saves_flops():
    policy, engine = cached_policy("uniform")
    reference = act(make_policy(), obs())
    out = act(policy, obs())
    assert engine.computed.sum() == 9 * 4 and engine.reused.sum() == 9 * 16
    assert not torch.equal(out, reference)
    assert 0.2 < engine.flops_ratio() < 0.4
    assert engine.stats()["peak_cache_mb"] > 0


def test_no_state_leaks_across_calls_or_batch_elements():
    policy, _ = cached_policy("uniform")
    a, b = obs(seed=1, B=1), obs(seed=2, B=1)
    fresh_a, fresh_b = act(policy, a), act(policy, b)
    assert torch.equal(act(policy, a), fresh_a)  # calling b in between changed nothing
    assert torch.equal(act(policy, b), fresh_b)
    # element 0 of a batch does not depend on what element 1 is
    ab = {"o": torch.cat([a["o"], b["o"]])}
    aa = {"o": torch.cat([a["o"], a["o"]])}
    torch.testing.assert_close(act(policy, ab)[0], act(policy, aa)[0], rtol=0, atol=1e-6)


def test_schedule_for_other_step_count_or_model_is_refused():
    from bac.schedule import ScheduleMismatch
    from policies.cache_target import make_schedule

    policy, engine = cached_policy("uniform")
    ddim = make_policy(scheduler="ddim", num_inference_steps=5)
    with pytest.raises(ScheduleMismatch, match="num_steps"):
        make_schedule(ddim, "unused", "uniform", n_updates=2).check_compatible(num_steps=20)
    with pytest.raises(ScheduleMismatch, match="scheduler"):
        engine.schedule.check_compatible(scheduler="DDIMScheduler")
    with pytest.raises(ScheduleMismatch, match="num_steps"):
        with engine.session(5):
            pass
    other = make_policy(seed=1)
    with pytest.raises(ScheduleMismatch, match="model_hash"):
        engine.schedule.check_compatible(model_hash=bac.engine.fingerprint(other.model))


def test_unknown_cache_and_missing_calibration_are_named(tmp_path):
    from policies.cache_target import make_schedule

    with pytest.raises(ValueError, match=r"unknown cache 'fast'; known caches: \['none', 'uniform'"):
        make_schedule(make_policy(), tmp_path, "fast")
    with pytest.raises(FileNotFoundError, match=r"DDPMScheduler_K20.npz is missing; make it with `python eval/calibrate.py"):
        make_schedule(make_policy(), tmp_path, "bac")


def check_fused_matches_unfused(policy):
    """Uniform reuse every 4 steps: fused layers give the unfused result. Shared with test_cuda."""
    from bac.schedule import uniform
    from policies.cache_target import policy_signature

    scheduler, K, model_hash = policy_signature(policy)
    blocks = [info.name for _, _, info in find_blocks(policy.model)]
    schedule = uniform(blocks, K, 4, scheduler=scheduler, model_hash=model_hash)
    outs = {}
    for fuse in (True, False):
        engine = attach(policy.model, schedule, fuse_layers=fuse)
        policy.step_cursor = engine
        outs[fuse] = act(policy, obs())
        assert engine.reused.sum() == 9 * 16 and engine.computed.sum() == 9 * 4
        engine.detach()
        policy.step_cursor = None
    torch.testing.assert_close(outs[True], outs[False], rtol=1e-5, atol=1e-5)
    assert "forward" not in vars(policy.model.decoder.layers[0])


def test_fused_layers_match_unfused_reuse():
    check_fused_matches_unfused(make_policy())


def check_stack_matches_layer_wrappers(policy):
    """The engine-run stack (cache_stack) gives bitwise the actions of the layer wrappers alone, with the
    same stats. Shared with test_cuda."""
    from bac.schedule import uniform
    from policies.cache_target import policy_signature

    scheduler, K, model_hash = policy_signature(policy)
    blocks = [info.name for _, _, info in find_blocks(policy.model)]
    schedule = uniform(blocks, K, 4, scheduler=scheduler, model_hash=model_hash)
    outs, stats = {}, {}
    cls = type(policy.model)
    declared = cls.cache_stack
    for stacked in (True, False):
        cls.cache_stack = declared if stacked else None
        try:
            engine = attach(policy.model, schedule)
            assert (engine._fusion.stack is not None) == stacked
            policy.step_cursor = engine
            outs[stacked] = act(policy, obs())
            stats[stacked] = (engine.computed.copy(), engine.reused.copy())
            engine.detach()
            policy.step_cursor = None
        finally:
            cls.cache_stack = declared
    assert torch.equal(outs[True], outs[False])
    assert all(np.array_equal(a, b) for a, b in zip(stats[True], stats[False]))
    assert "forward" not in vars(policy.model.decoder)


def test_engine_run_stack_is_bitwise_the_layer_path():
    check_stack_matches_layer_wrappers(make_policy())


def test_bad_cache_stack_is_named():
    policy = make_policy()
    cls = type(policy.model)
    declared = cls.cache_stack
    try:
        cls.cache_stack = "decoder.nope"
        with pytest.raises(ValueError, match="names no submodule"):
            attach(policy.model)
        cls.cache_stack = "head"
        with pytest.raises(ValueError, match="does not contain every cache layer"):
            attach(policy.model)
    finally:
        cls.cache_stack = declared
    assert "forward" not in vars(policy.model.decoder) and "forward" not in vars(policy.model.head)
    assert not any({"sa_block", "forward"} & set(vars(layer)) for layer in policy.model.decoder.layers)


def test_stack_calls_a_hooked_layer_as_a_module():
    """The engine-run stack calls a layer's forward directly, except when the layer has hooks: then the
    module call runs them at every step where the layer computes."""
    from bac.schedule import uniform
    from policies.cache_target import policy_signature

    policy = make_policy()
    scheduler, K, model_hash = policy_signature(policy)
    blocks = [info.name for _, _, info in find_blocks(policy.model)]
    schedule = uniform(blocks, K, 4, scheduler=scheduler, model_hash=model_hash)
    # layer 1 also computes at step 1, where layer 2 reuses: its add then follows a hooked layer's output
    schedule.steps.update({b: sorted({*schedule.steps[b], 1}) for b in blocks if b.startswith("decoder.layers.1.")})
    reference = None
    for hooked in (False, True):
        engine = attach(policy.model, schedule)
        policy.step_cursor = engine
        calls, held = [], []
        layer = policy.model.decoder.layers[1]

        def hook(module, args, output):  # keeps the layer's output and a copy: nothing may change it later
            calls.append(1)
            held.append((output, output.clone()))

        handle = layer.register_forward_hook(hook) if hooked else None
        out = act(policy, obs())
        engine.detach()
        policy.step_cursor = None
        if handle is not None:
            handle.remove()
        if reference is None:
            reference = out
    assert torch.equal(out, reference)  # the hook only observes
    rows = [i for i, b in enumerate(blocks) if b.startswith("decoder.layers.1.")]
    assert len(calls) == int(schedule.to_mask()[rows].any(0).sum()) > 0
    assert all(torch.equal(kept, copy) for kept, copy in held)  # reused layers add in place only on their own sums


def test_patterns_match_name_components():
    """``*`` is one dotted component, ``**`` any number, ``[...]`` a set; declared kinds for unknown names."""
    model = make_policy().model
    assert [b.name for _, _, b in find_blocks(model, "decoder.layers.[0-1].ff_block")] == [
        "decoder.layers.0.ff_block", "decoder.layers.1.ff_block"]
    assert len(find_blocks(model, "decoder.**.ff_block")) == 3
    with pytest.raises(ValueError, match="no blocks match"):
        find_blocks(model, "decoder.*.ff_block")
    with pytest.raises(ValueError, match="cannot tell the kind of block decoder.layers.0.linear1"):
        find_blocks(model, "decoder.layers.*.linear1")
    assert {b.kind for _, _, b in find_blocks(model, {"decoder.layers.*.linear1": "ffn"})} == {"ffn"}
