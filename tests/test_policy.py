"""DP-T model and policy: upstream parameter names and math, shapes, seeded sampling, input validation."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
import torch
from torch import nn

from policies import DiffusionTransformerPolicy, DPTConfig, Normalizer, load_policy, save_policy
from policies.transformer_for_diffusion import TransformerForDiffusion
from policies.diffusion_policy import SCHEDULERS

# Keys of upstream diffusion_policy's TransformerForDiffusion (obs_as_cond, time_as_cond, n_cond_layers=0),
# layer 0 only; every other layer repeats the decoder.layers.0 keys.
UPSTREAM_KEYS = {
    "pos_emb", "cond_pos_emb", "mask", "memory_mask",
    "input_emb.weight", "input_emb.bias", "cond_obs_emb.weight", "cond_obs_emb.bias",
    "encoder.0.weight", "encoder.0.bias", "encoder.2.weight", "encoder.2.bias",
    "ln_f.weight", "ln_f.bias", "head.weight", "head.bias",
    *(f"decoder.layers.0.{k}" for k in [
        "self_attn.in_proj_weight", "self_attn.in_proj_bias", "self_attn.out_proj.weight", "self_attn.out_proj.bias",
        "multihead_attn.in_proj_weight", "multihead_attn.in_proj_bias",
        "multihead_attn.out_proj.weight", "multihead_attn.out_proj.bias",
        "linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias",
        "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "norm3.weight", "norm3.bias",
    ]),
}


def small_config(**kw) -> DPTConfig:
    base = dict(obs_keys=["a", "b"], obs_dims=[3, 2], action_dim=4, horizon=8, n_obs_steps=2, n_action_steps=4,
                n_layer=2, n_emb=32, n_head=4, num_train_timesteps=20, num_inference_steps=20)
    base.update(kw)
    return DPTConfig(**base)


def small_policy(**kw) -> DiffusionTransformerPolicy:
    torch.manual_seed(0)
    cfg = small_config(**kw)
    rng = np.random.default_rng(0)
    norm = Normalizer.fit({"obs": rng.normal(size=(50, cfg.obs_dim)), "action": rng.normal(size=(50, cfg.action_dim))})
    return DiffusionTransformerPolicy(cfg, norm).eval()


def obs_batch(B=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(B, 2, 3, generator=g), "b": torch.randn(B, 2, 2, generator=g)}


def test_state_dict_keys_match_upstream():
    model = TransformerForDiffusion(7, 7, horizon=16, n_obs_steps=2, cond_dim=19, n_layer=1, n_emb=64, n_head=4)
    assert set(model.state_dict()) == UPSTREAM_KEYS
    assert model.state_dict()["pos_emb"].shape == (1, 16, 64)
    assert model.state_dict()["cond_pos_emb"].shape == (1, 3, 64)


def test_decoder_matches_torch_transformer_decoder():
    """Same weights in nn.TransformerDecoder (upstream's building block) give the same output."""
    torch.manual_seed(0)
    model = TransformerForDiffusion(7, 7, horizon=16, n_obs_steps=2, cond_dim=19, n_layer=3, n_emb=64).eval()
    ref = nn.TransformerDecoder(
        nn.TransformerDecoderLayer(64, 4, 256, 0.1, activation="gelu", batch_first=True, norm_first=True), 3
    ).eval()
    ref.load_state_dict({k[len("decoder."):]: v for k, v in model.state_dict().items() if k.startswith("decoder.")})
    x, memory = torch.randn(2, 16, 64), torch.randn(2, 3, 64)
    with torch.no_grad():
        ours = model.decoder(x, memory, model.mask, model.memory_mask)
        theirs = ref(x, memory, tgt_mask=model.mask, memory_mask=model.memory_mask)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_masks_are_causal_like_upstream():
    model = TransformerForDiffusion(2, 2, horizon=4, n_obs_steps=2, cond_dim=3, n_layer=1, n_emb=16)
    assert torch.equal(torch.isinf(model.mask), ~torch.tril(torch.ones(4, 4, dtype=torch.bool)))
    # action token t sees the time token and obs tokens up to t + 1
    expected = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(~torch.isinf(model.memory_mask), expected)


def test_precomputed_memory_path_matches():
    torch.manual_seed(0)
    model = TransformerForDiffusion(4, 4, horizon=8, n_obs_steps=2, cond_dim=5, n_layer=2, n_emb=32).eval()
    x, cond = torch.randn(3, 8, 4), torch.randn(3, 2, 5)
    with torch.no_grad():
        memory = model.memory(model.encode_obs(cond), model.encode_time(torch.tensor([9, 7])))  # (2, 3, 3, 32)
        assert memory.shape == (2, 3, 3, 32)
        torch.testing.assert_close(model(x, 7, cond), model(x, 7, memory=memory[1]), rtol=1e-6, atol=1e-6)


def test_predict_action_shapes_and_seeded_determinism():
    policy = small_policy()
    out1 = policy.predict_action(obs_batch(), generator=torch.Generator().manual_seed(5))
    out2 = policy.predict_action(obs_batch(), generator=torch.Generator().manual_seed(5))
    out3 = policy.predict_action(obs_batch(), generator=torch.Generator().manual_seed(6))
    assert out1["action"].shape == (3, 4, 4) and out1["action_pred"].shape == (3, 8, 4)
    assert torch.equal(out1["action"], out2["action"])
    assert not torch.equal(out1["action"], out3["action"])
    # executed actions start at the current observation's step, To - 1
    assert torch.equal(out1["action"], out1["action_pred"][:, 1:5])


class StepRecorder:
    """A step cursor that logs each session ("session", K) and each announced step (k, t)."""

    def __init__(self):
        self.log: list = []

    @contextlib.contextmanager
    def session(self, num_steps):
        self.log.append(("session", num_steps))
        yield

    def step(self, k, t):
        self.log.append((k, int(t)))

    @property
    def steps(self) -> list:
        """The announced step indices, with each session as ("session", K)."""
        return [e if e[0] == "session" else e[0] for e in self.log]


def test_ddim_option_runs_fewer_steps():
    policy = small_policy(scheduler="ddim", num_inference_steps=5)
    policy.step_cursor = rec = StepRecorder()
    policy.predict_action(obs_batch(B=1), generator=torch.Generator().manual_seed(0))
    assert rec.steps == [("session", 5), 0, 1, 2, 3, 4]
    ts = [t for _, t in rec.log[1:]]
    assert ts == sorted(ts, reverse=True)


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("K", [3, 8])
def test_every_sampler_runs_any_step_count(scheduler, K):
    """DDPM (strided), DDIM and the multistep solvers sample in exactly K announced steps, reproducibly."""
    policy = small_policy(scheduler=scheduler, num_inference_steps=K)
    policy.step_cursor = rec = StepRecorder()
    out = [policy.predict_action(obs_batch(B=2), generator=torch.Generator().manual_seed(0))["action"] for _ in range(2)]
    assert rec.steps == [("session", K), *range(K)] * 2
    assert torch.isfinite(out[0]).all() and torch.equal(out[0], out[1])


def test_multistep_solvers_clip_x0_as_ddpm_does():
    """clip_sample maps to thresholding at 1 on the solvers: their x0 prediction is clamped to [-1, 1]."""
    for name in ("dpmsolver", "unipc"):
        sched = small_policy(scheduler=name, num_inference_steps=4).noise_scheduler
        assert sched.config.thresholding and sched.config.sample_max_value == 1.0
        x0 = torch.tensor([[[-3.0, 0.5, 2.0]]])
        assert torch.equal(sched._threshold_sample(x0), x0.clamp(-1, 1))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match=r"num_inference_steps must be in \[1, num_train_timesteps=20\], got 21"):
        small_config(num_inference_steps=21)
    with pytest.raises(ValueError, match="scheduler 'euler' is unknown"):
        small_config(scheduler="euler")


def test_bad_observations_raise():
    policy = small_policy()
    obs = obs_batch()
    with pytest.raises(KeyError, match=r"missing keys \['b'\]"):
        policy.predict_action({"a": obs["a"]})
    with pytest.raises(ValueError, match=r"'a' must have shape \(B, 2, 3\), got \(3, 1, 3\)"):
        policy.predict_action({"a": obs["a"][:, :1], "b": obs["b"]})
    bad = obs["b"].clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'b' holds NaN"):
        policy.predict_action({"a": obs["a"], "b": bad})
    huge = obs["b"].clone()
    huge[0, 0, 0] = 1e30  # finite, but normalized far out of range: the denoiser overflows
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        policy.predict_action({"a": obs["a"], "b": huge})


def test_normalizer_round_trip_and_flat_dims():
    x = np.stack([np.linspace(-3, 5, 20), np.full(20, 2.0)], -1)
    norm = Normalizer.fit({"obs": x})
    y = norm.normalize("obs", torch.tensor(x, dtype=torch.float32))
    assert y[:, 0].min() == pytest.approx(-1) and y[:, 0].max() == pytest.approx(1)
    assert torch.allclose(y[:, 1], torch.zeros(20))  # a constant dim is centred, not blown up
    torch.testing.assert_close(norm.unnormalize("obs", y), torch.tensor(x, dtype=torch.float32))
    with pytest.raises(ValueError, match="NaN"):
        Normalizer.fit({"obs": np.array([[np.nan]])})


def test_checkpoint_round_trip(tmp_path):
    policy = small_policy()
    save_policy(policy, tmp_path, record={"steps": 1})
    loaded = load_policy(tmp_path)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    assert torch.equal(policy.predict_action(obs_batch(), g())["action"], loaded.predict_action(obs_batch(), g())["action"])
    assert json.loads((tmp_path / "config.json").read_text())["policy_type"] == "dpt"
    ddim = load_policy(tmp_path, num_inference_steps=4, scheduler="ddim")
    assert ddim.config.num_inference_steps == 4


def test_missing_checkpoint_names_file_and_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.safetensors is missing; train one with `python eval/train.py"):
        load_policy(tmp_path / "nope")


def test_checkpoint_verifies_its_weights_and_config(tmp_path):
    """A flipped bit in the weights, or an edit of a config field that changes what the model computes, is an
    error naming it; inference-time options stay overrides."""
    import shutil

    policy = small_policy()
    save_policy(policy, tmp_path / "ok")
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["weights"]["config"]["n_head"] == 4
    load_policy(tmp_path / "ok", num_inference_steps=5, scheduler="ddim")  # overrides are not edits

    flipped = tmp_path / "flipped"
    shutil.copytree(tmp_path / "ok", flipped)
    raw = bytearray((flipped / "model.safetensors").read_bytes())
    raw[-100] ^= 0x01  # one bit of one weight
    (flipped / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors does not match the sha256"):
        load_policy(flipped)
    for field, value in (("n_head", 8), ("beta_schedule", "linear")):
        edited = tmp_path / field
        shutil.copytree(tmp_path / "ok", edited)
        cfg = json.loads((edited / "config.json").read_text())
        saved = cfg[field]
        cfg[field] = value
        (edited / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match=f"{field}: saved {saved!r}, now {value!r}"):
            load_policy(edited)
