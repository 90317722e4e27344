"""The literature's caching methods on the one engine: exact when told to compute everything, really skipping
otherwise, close to uncached on a trained model, and no state across calls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bac import profiling
from bac.engine import attach, find_blocks
from bac.schedule import compute_all
from bac.strategies import (AdamsBashforth, BWCache, FBCache, FoCa, HyCa, MaskForecast, Reuse, Taylor, TeaCache,
                            ToCa, rel_l1)
from policies.cache_target import CACHE_METHODS, LITERATURE_METHODS, disable_cache, enable_cache, make_cache
from tests.conftest import compose_cfg
from tests.test_engine import act, make_policy, obs

K = 20  # make_policy's steps


def blocks_of(policy):
    return [info for _, _, info in find_blocks(policy.model)]


def run_with(policy, cache, o=None, seed=0):
    engine = attach(policy.model, cache)
    policy.step_cursor = engine
    try:
        return act(policy, obs() if o is None else o, seed), engine
    finally:
        engine.detach()
        policy.step_cursor = None


# ------------------------------------------------------------------------------------------- forecasters
def _history(f, ks, fn):
    f.reset(1)
    for k in ks:
        f.push(0, k, torch.tensor([fn(k)], dtype=torch.float64))


@pytest.mark.parametrize("forecaster", [Taylor(1), Taylor(3), AdamsBashforth(1), AdamsBashforth(2), AdamsBashforth(3), FoCa()])
def test_forecasters_are_exact_on_a_line(forecaster):
    _history(forecaster, [0, 3, 6, 9], lambda k: 2.0 - 0.5 * k)
    for k in (10, 11, 14):
        assert forecaster.predict(0, k).item() == pytest.approx(2.0 - 0.5 * k)


def test_foca_is_exact_on_a_parabola_within_one_interval_and_damped_beyond():
    f = FoCa()
    _history(f, [0, 4, 6], lambda k: 0.3 * k * k - k)  # uneven gaps: the variable-step BDF2 slope
    for k in (7, 8):
        assert f.predict(0, k).item() == pytest.approx(0.3 * k * k - k)
    far = f.predict(0, 16).item()  # past one interval the slope stops bending: below the parabola
    assert far < 0.3 * 16 * 16 - 16


def test_taylor_uses_only_the_orders_its_history_supports():
    t = Taylor(2)
    _history(t, [0], lambda k: 5.0)
    assert t.predict(0, 3).item() == 5.0  # one point: reuse
    _history(t, [0, 2], lambda k: 1.0 + k)
    assert t.predict(0, 5).item() == pytest.approx(6.0)


def test_hyca_takes_each_channel_from_its_solver():
    pool = [Reuse(), Taylor(1)]
    h = HyCa(pool, [np.array([0, 1, 1])])
    h.reset(1)
    for k in (0, 2):
        h.push(0, k, torch.tensor([[1.0 + k, 1.0 + k, 2.0 * k]]))
    out = h.predict(0, 3)
    assert torch.allclose(out, torch.tensor([[3.0, 4.0, 6.0]]))


def test_rel_l1_is_per_sample():
    prev = torch.ones(2, 3, 4)
    cur = prev.clone()
    cur[1] += 0.5
    assert torch.allclose(rel_l1(cur, prev), torch.tensor([0.0, 0.5]))


# ------------------------------------------------------------------------------------------- exactness
def compute_everything(policy):
    names = [b.name for b in blocks_of(policy)]
    infos = blocks_of(policy)
    return {
        "mask+taylor": MaskForecast(compute_all(names, K), Taylor(2)),
        "mask+foca": MaskForecast(compute_all(names, K), FoCa()),
        "teacache": TeaCache(0.0, [0, 0, 0, 1, 0]),
        "fbcache": FBCache(0.0),
        "bwcache": BWCache(0.0),
        "toca": ToCa(1),
        "fora": profiling.interval_schedule(names, K, 1),
        "delta_dit": profiling.delta_dit_schedule(infos, K, 5, 0),
        "profiling": profiling.profiling_schedule(infos, list(range(len(infos))), K, 2, 1, 0),
    }


@pytest.mark.parametrize("name", ["mask+taylor", "mask+foca", "teacache", "fbcache", "bwcache", "toca", "fora",
                                  "delta_dit", "profiling"])
def test_compute_everything_is_bitwise_identical(name):
    check_compute_everything(make_policy(), name)


def check_compute_everything(policy, name):
    """Strategy ``name`` told to compute everything gives the engine-free actions bit for bit. Shared with test_cuda."""
    reference = act(policy, obs())
    out, engine = run_with(policy, compute_everything(policy)[name])
    assert torch.equal(out, reference)
    assert engine.reused.sum() == 0


def test_strategies_keep_no_state_across_calls_and_clear_it_after_an_error():
    policy = make_policy()
    o1, o2 = obs(1), obs(2)
    for strategy in (TeaCache(0.5, [0, 0, 0, 1, 0]), FBCache(0.2), BWCache(0.2), ToCa(3, 0.5),
                     MaskForecast(profiling.interval_schedule([b.name for b in blocks_of(policy)], K, 4), FoCa())):
        fresh2, _ = run_with(policy, strategy, o2)
        engine = attach(policy.model, strategy)
        policy.step_cursor = engine
        act(policy, o1)
        assert torch.equal(act(policy, o2), fresh2), strategy.name  # o1 left nothing behind
        with pytest.raises(RuntimeError, match="boom"):
            with engine.session(K):
                engine.step(0, None)
                raise RuntimeError("boom")
        assert torch.equal(act(policy, o2), fresh2), strategy.name
        engine.detach()
        policy.step_cursor = None


def test_strategy_cannot_change_inside_a_session():
    policy = make_policy()
    engine = attach(policy.model, FBCache(0.1))
    with engine.session(K):
        with pytest.raises(RuntimeError, match="inside a cache session"):
            engine.set_schedule(None)
    engine.detach()


# ------------------------------------------------------------------------------------------- behaviour (untrained)
def test_online_triggers_skip_and_report_their_cost():
    policy = make_policy()
    for strategy in (TeaCache(0.5, [0, 0, 0, 1, 0]), FBCache(0.2), BWCache(0.2, max_reuse=3)):
        _, engine = run_with(policy, strategy)
        stats = engine.stats()
        assert 0 < stats["computed_fraction"] < 1, strategy.name
        assert stats["decision_ms_per_step"] > 0
        assert engine.computed[:, 0].min() == 1  # step 0 always computes
    tea = TeaCache(0.5, [0, 0, 0, 1, 0])
    _, engine = run_with(policy, tea)
    assert tea.skipped_steps and 0 not in tea.skipped_steps and K - 1 not in tea.skipped_steps
    assert engine.reused[:, tea.skipped_steps].min() > 0  # a skipped step reuses every block


def test_fbcache_always_runs_the_first_layer_and_bwcache_caps_reuse():
    policy = make_policy()
    _, engine = run_with(policy, FBCache(10.0))  # any change counts as small: the tail reuses after step 0
    first = [i for i, b in enumerate(engine.blocks) if b.layer == 0]
    rest = [i for i in range(len(engine.blocks)) if i not in first]
    assert engine.reused[first].sum() == 0 and engine.computed[rest, 1:].sum() == 0
    _, engine = run_with(policy, BWCache(10.0, max_reuse=3))
    for b in range(len(engine.blocks)):  # computes every 4th step: reuse at most 3 in a row
        assert engine.computed[b].nonzero()[0].tolist() == list(range(0, K, 4))


def test_toca_recomputes_a_fraction_of_ffn_tokens_only():
    policy = make_policy()
    _, engine = run_with(policy, ToCa(4, ratio=0.5))
    ffn = [i for i, b in enumerate(engine.blocks) if b.kind == "ffn"]
    attn = [i for i, b in enumerate(engine.blocks) if b.kind != "ffn"]
    off = [k for k in range(K) if k % 4]
    assert np.allclose(engine.computed[np.ix_(ffn, off)], 0.5)  # 4 of 8 tokens
    assert engine.computed[np.ix_(attn, off)].sum() == 0
    assert np.allclose(engine.computed[:, ::4], 1.0)


def test_static_masks_have_their_shape():
    policy = make_policy()
    infos = blocks_of(policy)
    m = profiling.delta_dit_schedule(infos, K, 5, 1, boundary=0.5).to_mask()  # 3 layers: rear = 2, front = 0
    layer = np.array([b.layer for b in infos])
    assert m[layer == 2, :10].sum(1).tolist() == [2, 2, 2] and m[layer == 2, 10:].all()
    assert m[layer == 0, :10].all() and m[layer == 0, 10:].sum(1).tolist() == [2, 2, 2]
    assert m[layer == 1].all()
    p = profiling.profiling_schedule(infos, [0.0] * 8 + [9.0], K, 1, 5, 2).to_mask()
    assert p[-1].all() and p[:-1].sum(1).tolist() == [len({0, 1} | set(range(0, K, 5)))] * 8
    f = profiling.interval_schedule([b.name for b in infos], K, 3, warmup=2).to_mask()
    assert f[0].nonzero()[0].tolist() == [0, 1, 3, 6, 9, 12, 15, 18]


def test_erta_picks_steps_where_the_residual_moves_and_fits_alpha():
    rng = np.random.default_rng(0)
    drift = np.concatenate([np.full(10, 0.5), np.full(10, 0.01)])  # the first half moves fast
    traj = np.cumsum(drift)[:, None, None, None] * (1 + 0.01 * rng.normal(size=(20, 2, 3, 4)))
    feats = {"a": traj, "b": traj * 2}
    s = profiling.erta_schedule(["a", "b"], feats, 6)
    steps = s.steps["a"]
    assert len(steps) <= 6 and steps[0] == 0 and steps[-1] == 19 and sum(k < 10 for k in steps) >= 3
    alpha = profiling.fit_erta(s, feats, ["a", "b"])
    assert alpha.shape == (2, 20) and (alpha >= 0).all() and alpha.max() > 0


# ------------------------------------------------------------------------------------------- on a trained model
@pytest.fixture(scope="module")
def calibrated(toy_checkpoint):
    import eval.calibrate as calibrate

    data = toy_checkpoint.parent / "toy.hdf5"
    calibrate.calibrate(compose_cfg("env=toy", f"policy.checkpoint={toy_checkpoint}", f"calibrate.dataset={data}",
                                    "calibrate.n_obs=4", "calibrate.n_updates=[10]"))
    from policies import load_policy

    return toy_checkpoint, load_policy(toy_checkpoint)


MODERATE = {  # roughly 3x fewer block calls on the toy policy (DDPM-100)
    "fora": {"interval": 3}, "delta_dit": {"n_cached_layers": 2, "interval": 4}, "profiling": {"n_always": 1},
    "ertacache": {"n_updates": 33, "n_obs": 4}, "teacache": {"delta": 0.3, "n_obs": 4},
    "fbcache": {"threshold": 0.5}, "bwcache": {"threshold": 0.5}, "toca": {"interval": 3, "ratio": 0.3},
    "taylorseer": {"interval": 3, "order": 1}, "foca": {"interval": 3}, "abcache": {"interval": 3, "order": 2},
    "hyca": {"interval": 3, "n_obs": 4}, "bac_forecast": {"n_updates": 20, "forecaster": "taylor"},
}
EVERYTHING = {  # the same methods told to compute every block at every step
    "fora": {"interval": 1}, "delta_dit": {"n_cached_layers": 0}, "profiling": {"interval": 1},
    "ertacache": {"n_updates": 100, "n_obs": 4}, "teacache": {"delta": 0.0, "n_obs": 4}, "fbcache": {"threshold": 0.0},
    "bwcache": {"threshold": 0.0}, "toca": {"interval": 1}, "taylorseer": {"interval": 1},
    "foca": {"interval": 1}, "abcache": {"interval": 1}, "hyca": {"interval": 1, "n_obs": 4},
    "bac_forecast": {"n_updates": 100, "n_bubble": 5},
}


def method_cfg(name, knobs):
    from eval.common import method_defaults

    return {**method_defaults(name), **knobs}


def test_every_method_has_a_config_and_the_tables_cover_them():
    assert set(MODERATE) == set(EVERYTHING) == set(LITERATURE_METHODS)
    for name in CACHE_METHODS:
        assert method_cfg(name, {})["name"] == name
    with pytest.raises(ValueError, match="unknown cache 'nope'"):
        method_cfg("nope", {})


@pytest.mark.parametrize("name", LITERATURE_METHODS)
def test_method_exact_when_computing_everything_and_close_when_caching(calibrated, name):
    checkpoint, policy = calibrated
    o = {k: torch.randn(3, policy.config.n_obs_steps, d, generator=torch.Generator().manual_seed(5)) * 0.3
         for k, d in zip(policy.config.obs_keys, policy.config.obs_dims)}
    ref = act(policy, o, 7)
    everything = make_cache(policy, checkpoint, method_cfg(name, EVERYTHING[name]))
    engine = enable_cache(policy, everything)
    assert torch.equal(act(policy, o, 7), ref), name
    disable_cache(policy, engine)

    cache = make_cache(policy, checkpoint, method_cfg(name, MODERATE[name]))
    engine = enable_cache(policy, cache)
    out = act(policy, o, 7)
    ratio = engine.flops_ratio()
    disable_cache(policy, engine)
    assert ratio < 0.75, f"{name} computed {ratio:.2f} of the FLOPs"
    other_noise = act(policy, o, 8)  # the scale of a different sample of the same policy
    err, spread = (out - ref).pow(2).mean().item(), (other_noise - ref).pow(2).mean().item()
    assert err < 0.5 * spread, f"{name}: error {err:.2e} vs sampling spread {spread:.2e}"


def test_run_and_bench_take_a_literature_method(calibrated, tmp_path):
    import eval.bench as bench
    import eval.run as run

    checkpoint, _ = calibrated
    base = ["env=toy", f"policy.checkpoint={checkpoint}"]
    summary = run.evaluate(compose_cfg(*base, "cache=teacache", "cache.delta=0.3", "cache.n_obs=4",
                                       "eval.n_episodes=4", "eval.n_envs=4", "eval.latency_trials=2"), tmp_path / "run")
    assert summary["cache"] == "teacache" and summary["cache_config"]["delta"] == 0.3
    assert 0 < summary["flops_ratio"] < 1 and summary["cache_stats"]["decision_ms_per_step"] > 0
    assert summary["cache_stats"]["schedule"]["fit"]["coeffs"]
    rows = bench.bench(compose_cfg(*base, "bench.caches=[none,{name:foca,interval:4},{name:fbcache,threshold:0.1}]",
                                   "bench.trials=1", "bench.warmup=0", "bench.n_obs=2"), tmp_path / "bench")
    by = {r["config"]: r for r in rows}
    assert set(by) == {"none", "foca[interval=4]", "fbcache[threshold=0.1]"}
    assert by["fbcache[threshold=0.1]"]["decision_ms_per_step"] > 0 and by["foca[interval=4]"]["flops_ratio"] < 0.5
    import eval.report as report

    report.main(["methods", str(tmp_path / "run"), "--bench", str(tmp_path / "bench"), "--out", str(tmp_path / "m.md"),
                 "--plot", str(tmp_path / "p.png")])
    md = (tmp_path / "m.md").read_text()
    assert "| toy | teacache | delta=0.3 | 4 |" in md and (tmp_path / "p.png").stat().st_size > 10_000


def test_report_joins_rollouts_with_their_bench_rows():
    import eval.report as report

    knobs = {"name": "fora", "interval": 3, "warmup": 1}
    runs = [{"task": "can", "cache": "none", "n_episodes": 50, "success_rate": 0.7, "success_ci95": [0.56, 0.81],
             "latency_ms": {"p50": 500.0}},
            {"task": "can", "cache": "fora", "cache_config": knobs | {"n_obs": 8}, "n_episodes": 50,
             "success_rate": 0.5, "success_ci95": [0.37, 0.63], "flops_ratio": 0.34, "latency_ms": {"p50": 180.0}}]
    for r in runs:
        r.update(scheduler="ddpm", num_inference_steps=100)
    bench = {("can", "ddpm-100", report.cache_key("fora", knobs)): {"speedup": 2.6, "action_mse": 2e-3},
             ("can", "ddim-10", report.cache_key("fora", knobs)): {"speedup": 9.9, "action_mse": 1.0}}
    rows = report.method_rows(runs, bench)
    md = report.methods_table(rows)
    assert "| can | fora | interval=3 | 50 | 0.50 [0.37, 0.63] | no | 2.94x | 2.60x | 2.00e-03 |" in md
    assert "| can | none | - | 50 | 0.70 [0.56, 0.81] | - | 1.00x | - | - |" in md


def test_mask_with_plain_reuse_is_the_schedule_path():
    policy = make_policy()
    names = [b.name for b in blocks_of(policy)]
    schedule = profiling.interval_schedule(names, K, 3, method="fora")
    engine = attach(policy.model, schedule, fuse_layers=False)
    policy.step_cursor = engine
    via_mask = act(policy, obs())
    engine.detach()
    out, _ = run_with(policy, MaskForecast(schedule, Reuse()))
    assert torch.equal(out, via_mask)
