"""Bring your own model: cache a denoiser that is not DP-T with BAC, from outside, in five steps.

    python examples/own_model.py          # a few seconds on one CPU core

attach -> calibrate -> schedule -> sample -> detach. The denoiser below is plain torch and knows nothing of bac;
the engine only needs to find its residual branches: callables whose output the layer adds to the stream.
Shapes: B batch, T horizon, Da action dim, Do obs dim, K denoising steps, D width.
"""
from __future__ import annotations

import time

import torch
from diffusers import DDPMScheduler
from torch import nn

import bac.engine
from bac.calibration import Calibration
from bac.sampling import denoise

B, T, Da, Do, K, D, N_LAYER = 1, 16, 7, 10, 20, 64, 4
S, N_BUBBLE = 6, 1  # BAC's budget: 6 update steps of 20 per block, Bubbling Union over the block that drifts most


class Layer(nn.Module):
    """A pre-norm transformer layer whose two residual branches are methods (as DP-T's sa_block/ff_block)."""

    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def sa_block(self, x):  # (B, T, D) -> (B, T, D): the delta the layer adds
        h = self.norm1(x)
        return self.attn(h, h, h, need_weights=False)[0]

    def ff_block(self, x):  # (B, T, D) -> (B, T, D)
        return self.mlp(self.norm2(x))

    def forward(self, x):
        x = x + self.sa_block(x)  # the engine reuses a cached delta on the *current* stream x
        return x + self.ff_block(x)


class Denoiser(nn.Module):
    """eps(x_t, t, obs): (B, T, Da), (), (B, Do) -> (B, T, Da). The observation and time condition every token."""

    def __init__(self):
        super().__init__()
        self.inp, self.cond, self.out = nn.Linear(Da, D), nn.Linear(Do, D), nn.Linear(D, Da)
        self.time = nn.Sequential(nn.Linear(1, D), nn.SiLU(), nn.Linear(D, D))
        self.pos = nn.Parameter(0.02 * torch.randn(1, T, D))
        self.layers = nn.ModuleList(Layer() for _ in range(N_LAYER))

    def forward(self, x, t, obs):
        c = self.cond(obs) + self.time(t.float().reshape(1, 1) / 100)  # (B, D)
        h = self.inp(x) + self.pos + c[:, None]  # (B, T, D)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def sample(model, obs, cursor=None, seed=0):
    """One action chunk: K reverse DDPM steps; ``cursor`` (the engine) is told each step before the model runs."""
    gen = torch.Generator().manual_seed(seed)  # same seed, same noise: cached and uncached runs are comparable
    noise = torch.randn(obs.shape[0], T, Da, generator=gen)
    return denoise(lambda x, t, k: model(x, t, obs), scheduler, noise, K, generator=gen, cursor=cursor)


def p50_ms(fn, n=15):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return sorted(times)[n // 2]


torch.manual_seed(0)
torch.set_num_threads(1)
scheduler = DDPMScheduler(num_train_timesteps=100)
model = Denoiser().eval()
before = {k: v.clone() for k, v in model.state_dict().items()}
obs, calib_obs = torch.randn(B, Do), torch.randn(16, Do)  # a robot's observation; 16 for calibration

with torch.no_grad():
    reference = sample(model, obs)  # the model as it is, no engine
    uncached_ms = p50_ms(lambda: sample(model, obs))

    # 1. attach: wrap the residual branches from outside (a pattern: module glob, then the branch attribute).
    #    A model may instead declare it as a class attribute `cache_blocks`, plus `cache_layers`/`cache_stack`.
    engine = bac.engine.attach(model, blocks="layers.*.{sa_block,ff_block}")
    same = torch.equal(sample(model, obs, engine), reference)  # no schedule yet: every block every step
    print(f"attached {len(engine.blocks)} blocks; compute-everything output identical: {same}")

    # 2. calibrate: record every block's delta at every step of an uncached run, keep per-block K x K similarities.
    with engine.recording() as rec:
        sample(model, calib_obs, engine)
    features = {name: torch.stack(outs).flatten(2).numpy() for name, outs in rec.items()}  # (K, N, T*D)
    calib = Calibration.from_features(features, engine.blocks, scheduler=type(scheduler).__name__,
                                      model_hash=bac.engine.fingerprint(model))

    # 3. schedule: ACS per block, then the Bubbling Union; the schedule knows K, sampler and model it was made for.
    schedule = calib.schedule("bac", n_updates=S, n_bubble=N_BUBBLE)
    schedule.check_compatible(num_steps=K, scheduler=type(scheduler).__name__, model_hash=bac.engine.fingerprint(model))
    engine.set_schedule(schedule)
    engine.profile_flops(lambda: model(torch.zeros(1, T, Da), torch.tensor(0), torch.zeros(1, Do)))

    # 4. sample with the cache.
    cached = sample(model, obs, engine)
    cached_ms = p50_ms(lambda: sample(model, obs, engine))
    mse = float((cached - reference).pow(2).mean())
    print(f"bac S={S} n={N_BUBBLE}: {schedule.computed_fraction():.2f} of block calls computed, "
          f"FLOPs ratio {engine.flops_ratio():.2f}")
    print(f"latency p50 {uncached_ms:.1f} ms uncached -> {cached_ms:.1f} ms cached ({uncached_ms / cached_ms:.1f}x); "
          f"action MSE vs uncached {mse:.1e}")

    # 5. detach: every wrapper is gone, the weights untouched, the output the uncached one again.
    engine.detach()
    restored = (not any({"sa_block", "ff_block"} & set(vars(layer)) for layer in model.layers)
                and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
                and torch.equal(sample(model, obs), reference))
    print(f"detached; model restored: {restored}")

if not (same and restored):
    raise SystemExit("a check failed: compute-everything must be identical and detach must restore the model")
