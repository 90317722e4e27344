"""lerobot as an optional extra (integrations/lerobot, docs/lerobot.md): skipped where lerobot is not installed.

The demos' round trip through a LeRobotDataset v3.0, and for each adapter (XVLA, SmolVLA, GR00T action head, tiny
random-init models built offline): the engine attaches, computing everything is bit-identical to no engine, a
skipping schedule really reuses, detach leaves no trace, and an episode of our control loop runs with it.
"""
import os

import pytest

pytest.importorskip("lerobot")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub

import gymnasium as gym  # noqa: E402
import h5py  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bac.loop import simulate  # noqa: E402
from bac.methods import build_cache  # noqa: E402
from bac.protocol import attach_to, blocks_of  # noqa: E402
from envs.recorder import DemoWriter, read_demos  # noqa: E402
from envs.toy import ToyExpert, ToyReachEnv  # noqa: E402
from integrations.lerobot.adapters import ADAPTERS, disable_cache, enable_cache, make_adapter  # noqa: E402
from integrations.lerobot.dataset import export_demos, read_lerobot  # noqa: E402

K = 10


def _toy_demos(path, n=3, steps=12, image_size=None):
    """Scripted toy demos in the recorder's layout; with ``image_size``, an (L, S, S, 3) uint8 camera key too (the
    recorder flattens obs to float, so that file is written with h5py as robomimic lays out image demos)."""
    env = ToyReachEnv(render_mode="rgb_array", render_size=image_size or 16)
    expert = ToyExpert(np.random.default_rng(0))
    demos = []
    for seed in range(n):
        obs, _ = env.reset(seed=seed)
        expert.reset()
        rec = {k: [] for k in obs} | ({"agentview_image": []} if image_size else {})
        actions = []
        for _ in range(steps + seed):  # unequal lengths: the boundaries must come back where they were
            for k, v in obs.items():
                rec[k].append(v)
            if image_size:
                rec["agentview_image"].append(env.render())
            actions.append(expert.act(obs))
            obs, *_ = env.step(actions[-1])
        demos.append(({k: np.stack(v) for k, v in rec.items()}, np.stack(actions), seed))
    if not image_size:
        with DemoWriter(path, env.env_meta()) as w:
            for obs, actions, seed in demos:
                w.add(obs, actions, seed=seed)
        return path
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        data.attrs["env_args"] = '{"env_name": "ToyReach"}'
        for i, (obs, actions, seed) in enumerate(demos):
            g = data.create_group(f"demo_{i}")
            for k, v in obs.items():
                g.create_dataset(f"obs/{k}", data=v)
            g.create_dataset("actions", data=actions)
            g.create_dataset("rewards", data=np.zeros(len(actions), np.float32))
            g.create_dataset("dones", data=np.eye(1, len(actions), len(actions) - 1, dtype=np.int64)[0])
            g.attrs["num_samples"], g.attrs["seed"] = len(actions), seed
    return path


@pytest.mark.parametrize("image_size", [None, 16])
def test_demos_round_trip_through_lerobot_dataset(tmp_path, image_size):
    demo_path = _toy_demos(tmp_path / "toy.hdf5", image_size=image_size)
    root = export_demos(demo_path, tmp_path / "lerobot", fps=10, task="reach the goal")
    assert (root / "meta" / "info.json").exists()
    assert '"codebase_version": "v3.0"' in (root / "meta" / "info.json").read_text()
    meta, back = read_lerobot(root)
    meta0, demos = read_demos(demo_path)
    assert meta == meta0
    assert [len(d["actions"]) for d in back] == [len(d["actions"]) for d in demos] == [12, 13, 14]
    for got, want in zip(back, demos):
        assert (got["name"], got["seed"]) == (want["name"], want["seed"])
        assert sorted(got["obs"]) == sorted(want["obs"])
        for k in want["obs"]:
            assert got["obs"][k].dtype == want["obs"][k].dtype and np.array_equal(got["obs"][k], want["obs"][k]), k
        for k in ("actions", "rewards", "dones"):
            assert np.array_equal(got[k], want[k]), k
    if image_size:
        assert back[0]["obs"]["agentview_image"].shape == (12, image_size, image_size, 3)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("lerobot_models"))
    return {name: make_adapter(name, num_steps=K, workdir=workdir) for name in ADAPTERS}


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _traces(module):
    """What a wrapper or hook left on the model's modules (instance forwards, per-step wrappers, forward hooks)."""
    return [name for name, m in module.named_modules()
            if {"forward", "denoise_step"} & set(vars(m)) or m._forward_hooks or m._forward_pre_hooks]


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_compute_everything_is_exact(adapters, name):
    ad = adapters[name]
    obs = ad.calibration_obs(2)
    ref = ad.sample(obs, None, seed=7)
    assert ref.shape == (2, ad.horizon, ad.action_dim) and torch.isfinite(ref).all()
    engine = attach_to(ad, build_cache(ad, {"name": "uniform", "n_updates": K}))
    try:
        out = ad.sample(obs, engine, seed=7)
        assert engine.reused.sum() == 0 and engine.computed.sum() == len(engine.blocks) * K * 1
    finally:
        engine.detach()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_skipping_schedule_reuses_and_detach_leaves_no_trace(adapters, name):
    ad = adapters[name]
    before = _state(ad.cache_model())
    obs = ad.calibration_obs(2)
    ref = ad.sample(obs, None, seed=7)
    engine = attach_to(ad, build_cache(ad, {"name": "uniform", "n_updates": 3}))
    try:
        out = ad.sample(obs, engine, seed=7)
        assert _traces(ad.cache_model())  # the engine's wrappers are on
    finally:
        engine.detach()
    assert engine.reused.sum() > 0 and torch.isfinite(out).all()
    assert not torch.equal(out, ref)  # the reuse changed something, as skipping does
    after = _state(ad.cache_model())
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert _traces(ad.cache_model()) == []
    assert torch.equal(ad.sample(obs, None, seed=7), ref)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_blocks_are_the_declared_branches(adapters, name):
    ad = adapters[name]
    blocks = blocks_of(ad)  # one cache_call traced: the blocks in the order they run
    want = {"xvla": 4, "smolvla": 4, "groot": 8}[name]
    assert len(blocks) == want
    assert {b.kind for b in blocks} >= {"ffn"}
    assert _traces(ad.cache_model()) == []


class _CameraToy(gym.Wrapper):
    """The toy env with its rendered frame as the ``image`` observation (S x S x 3 uint8)."""

    def _obs(self, obs):
        return {**obs, "image": self.env.render()}

    def reset(self, **kw):
        obs, info = self.env.reset(**kw)
        return self._obs(obs), info

    def step(self, action):
        obs, *rest = self.env.step(action)
        return (self._obs(obs), *rest)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_control_loop_episode_with_engine_attached(adapters, name):
    ad = adapters[name]
    envs = [_CameraToy(ToyReachEnv(render_mode="rgb_array", render_size=ad.image_size)) for _ in range(2)]
    engine = enable_cache(ad, build_cache(ad, {"name": "uniform", "n_updates": 5}))
    try:
        results = simulate(envs, [0, 1], ad.predictor(seed=0), n_obs_steps=1, n_action_steps=4, max_steps=12)
    finally:
        disable_cache(ad, engine)
    assert [r.steps for r in results] == [12, 12] or all(r.success for r in results if r.steps < 12)
    assert engine.n_sessions == 3 and engine.reused.sum() > 0  # 12 ticks / 4 actions = 3 batched chunks
    assert _traces(ad.cache_model()) == [] and ad.step_cursor is None
