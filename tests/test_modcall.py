"""``bac.modcall.bind`` computes what the module call computes, and steps aside for hooks and overrides;
DP-T's per-run ``denoiser`` is its forward, bit for bit."""
from __future__ import annotations

import torch
from torch import nn

from bac.modcall import bind, needs_module_call
from policies.transformer_for_diffusion import TransformerForDiffusion


def test_bind_is_the_module_call():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 8)
    for module in (nn.Linear(8, 3), nn.Linear(8, 3, bias=False), nn.LayerNorm(8), nn.GELU()):
        assert torch.equal(bind(module)(x), module(x))


def test_bind_steps_aside_for_hooks_overrides_and_subclasses():
    lin = nn.Linear(4, 4)
    assert not needs_module_call(lin)
    calls = []
    handle = lin.register_forward_hook(lambda m, a, o: calls.append(1))
    assert needs_module_call(lin) and bind(lin) is lin
    bind(lin)(torch.zeros(1, 4))
    assert calls == [1]
    handle.remove()
    global_handle = nn.modules.module.register_module_forward_pre_hook(lambda m, a: None)
    try:
        assert bind(lin) is lin  # a global hook (FlopCounterMode registers some) needs every module call
    finally:
        global_handle.remove()
    lin.__dict__["forward"] = lambda x: x + 1  # an instance-level forward (a cache engine's wrapper, say)
    assert torch.equal(bind(lin)(torch.zeros(1, 4)), torch.ones(1, 4))
    del lin.__dict__["forward"]

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    scaled = Scaled(4, 4)
    assert torch.equal(bind(scaled)(torch.ones(1, 4)), scaled(torch.ones(1, 4)))


def test_denoiser_is_forward_and_runs_hooks():
    torch.manual_seed(0)
    model = TransformerForDiffusion(input_dim=3, output_dim=3, horizon=8, n_obs_steps=2, cond_dim=5,
                                    n_layer=2, n_emb=32, n_head=4, p_drop_emb=0.1).eval()
    timesteps = torch.tensor([90, 50, 10])
    memory = model.memory(model.encode_obs(torch.randn(2, 2, 5)), model.encode_time(timesteps))
    memories = memory.unbind(0)
    x = torch.randn(2, 8, 3)
    with torch.no_grad():
        want = [model(x, t, memory=memories[k]) for k, t in enumerate(timesteps)]
        step = model.denoiser(memories)
        assert all(torch.equal(step(x, t, k), want[k]) for k, t in enumerate(timesteps))
        seen = []
        handle = model.head.register_forward_hook(lambda m, a, o: seen.append(o))
        out = model.denoiser(memories)(x, timesteps[1], 1)
        handle.remove()
        assert len(seen) == 1 and torch.equal(out, want[1])
        calls = []
        handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))  # a hook on the model itself
        assert torch.equal(model.denoiser(memories)(x, timesteps[2], 2), want[2]) and calls == [1]
        handle.remove()
        model.train()  # dropout active: the denoiser draws the same dropout masks as forward
        torch.manual_seed(5)
        train_out = model.denoiser(memories)(x, timesteps[0], 0)
        torch.manual_seed(5)
        assert torch.equal(train_out, model(x, timesteps[0], memory=memories[0]))
        assert not torch.equal(train_out, want[0])
