"""lerobot's XVLA, SmolVLA and GR00T action head inside our control loop, with the cache engine attached.

Each adapter wraps one lerobot model, unchanged, and offers two faces:

- the loop's chunk predictor (``bac.loop.simulate``'s ``predict``): ``adapter.predictor(seed)`` maps a batch of
  observation histories ``{key: (B, To, ...)}`` to an action chunk ``(B, T, Da)`` (numpy), one lerobot sampling
  run per call. No queue and no observation history live in the adapter (lerobot's ``select_action`` keeps
  both; we call the model's sampling function directly, the runtime owns time). Only the last observation
  step is used (these policies take ``n_obs_steps = 1``).
- ``bac.protocol.CacheTarget``: ``cache_model`` (the lerobot module the engine attaches to), ``cache_blocks``
  (its cacheable residual branches), ``cache_signature``, ``cache_call`` (one denoiser call as the loop makes
  it, replayed from a captured run) and ``cache_sample(cursor, n, seed)`` (a sampling run over n seeded
  calibration observations, returning the chunk).

Steps reach the cursor through ``announce.announcing``: lerobot's own Euler loop runs as it is and its per-step
denoiser call is wrapped for the run (XVLA ``model.transformer.forward``, SmolVLA ``model.denoise_step``, GR00T
``model.forward`` of the head's DiT). Noise: XVLA and GR00T draw it from torch's global generator, SmolVLA's
``sample_noise`` too; a run forks the global RNG state and seeds it, so a seed gives the same chunk and the
caller's RNG state is untouched.

Observations: the low-dim keys ``obs_dims`` side by side are the state (Do); an image key (B, To, S, S, 3) uint8
is the camera if the batch has it, else a black frame (the toy env has no camera). The language instruction is
a fixed list of token ids (the tiny models have random embeddings; there is no tokenizer to respect).

    adapter = make_adapter("xvla", obs_dims={"agent_pos": 2, "goal_pos": 2})
    engine = enable_cache(adapter, build_cache(adapter, {"name": "uniform", "n_updates": 5}))
    simulate(envs, seeds, adapter.predictor(seed=0), 1, 8, max_steps=40)
    disable_cache(adapter, engine)
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from bac.engine import CacheEngine, fingerprint
from bac.methods import build_cache  # noqa: F401 (re-exported for the usage above)
from bac.protocol import Signature, attach_to
from integrations.lerobot.announce import announcing
from integrations.lerobot.tiny import tiny_groot_head, tiny_smolvla, tiny_xvla

TASK_TOKENS = (9, 10, 11, 12)  # the fixed instruction, as token ids (below tiny.VOCAB, past the special tokens)


class LerobotAdapter:
    """Shared by the three adapters (see the module docstring); subclasses say where the steps and blocks are."""

    kind = ""  # the registry name
    step_attr, t_arg = "forward", "timestep"  # the per-step call on ``step_owner()`` and its timestep keyword

    def __init__(self, module: nn.Module, obs_dims: Mapping[str, int], state_dim: int, action_dim: int, horizon: int,
                 num_steps: int, image_key: str = "image", image_size: int = 32):
        if sum(obs_dims.values()) != state_dim:
            raise ValueError(f"the low-dim keys {dict(obs_dims)} add up to {sum(obs_dims.values())} dims; the model's "
                             f"state has {state_dim}")
        self.module, self.obs_dims, self.obs_keys, self.image_key = module, dict(obs_dims), tuple(obs_dims), image_key
        self.state_dim, self.action_dim, self.horizon = state_dim, action_dim, horizon
        self.num_steps, self.image_size = num_steps, image_size
        self.step_cursor = None  # the engine that ``predictor`` announces to (``enable_cache`` sets it)

    # -------------------------------------------------------------- what a subclass provides
    def step_owner(self) -> object:
        raise NotImplementedError

    def generate(self, state: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """lerobot's own sampling: state (B, Do), image (B, 3, S, S) in [0, 1] -> chunk (B, T, Da)."""
        raise NotImplementedError

    def protected(self):
        """A context for runs that need it (SmolVLA: its inlined layer adds into a branch's output in place)."""
        return nullcontext()

    # -------------------------------------------------------------- sampling
    def observe(self, obs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``{key: (B, To, ...)}`` -> state (B, Do) float32 and image (B, 3, S, S) in [0, 1], last obs step."""
        missing = [k for k in self.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation lacks {missing}; it has {sorted(obs)}")
        B = obs[self.obs_keys[0]].shape[0]
        state = torch.cat([torch.as_tensor(obs[k])[:, -1].reshape(B, -1).float() for k in self.obs_keys], dim=1)
        if state.shape[1] != self.state_dim:
            raise ValueError(f"state of {self.obs_keys} has {state.shape[1]} dims, the model takes {self.state_dim}")
        if self.image_key in obs:
            image = torch.as_tensor(obs[self.image_key])[:, -1].permute(0, 3, 1, 2).float() / 255  # (B, 3, S, S)
        else:
            image = torch.zeros(B, 3, self.image_size, self.image_size)
        return state, image

    def sample(self, obs: dict[str, torch.Tensor], cursor=None, seed: int = 0, capture: list | None = None) -> torch.Tensor:
        """One lerobot sampling run announcing its K steps to ``cursor``; returns the chunk (B, T, Da)."""
        state, image = self.observe(obs)
        with torch.no_grad(), torch.random.fork_rng(devices=[]), self.protected():
            torch.manual_seed(seed)
            with announcing(self.step_owner(), self.step_attr, cursor, self.num_steps, self.t_arg, capture):
                return self.generate(state, image)

    def predictor(self, seed: int = 0, n_chunk: int | None = None) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
        """``predict(obs numpy) -> (B, n_chunk, Da)`` for ``bac.loop.simulate``; each call draws its noise seed
        from a generator seeded with ``seed`` and announces to ``self.step_cursor`` (None: no cache)."""
        rng = np.random.default_rng(seed)
        n = self.horizon if n_chunk is None else n_chunk

        def predict(batch: dict[str, np.ndarray]) -> np.ndarray:
            obs = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
            return self.sample(obs, self.step_cursor, int(rng.integers(2**31)))[:, :n].numpy()

        return predict

    # -------------------------------------------------------------- bac.protocol.CacheTarget
    def cache_model(self) -> nn.Module:
        return self.module

    def cache_signature(self) -> Signature:
        return Signature(f"lerobot.{self.kind}.flow_euler", self.num_steps, fingerprint(self.module))

    def calibration_obs(self, n: int) -> dict[str, torch.Tensor]:
        """n seeded observations (state from N(0, 1), a random image), To = 1."""
        g = torch.Generator().manual_seed(1234)
        obs = {k: torch.randn(n, 1, d, generator=g) for k, d in self.obs_dims.items()}
        obs[self.image_key] = torch.randint(0, 256, (n, 1, self.image_size, self.image_size, 3), generator=g,
                                            dtype=torch.uint8)
        return obs

    def cache_sample(self, cursor, n: int, seed: int) -> torch.Tensor:
        return self.sample(self.calibration_obs(n), cursor, seed)

    def cache_call(self) -> Callable[[], object]:
        """The first denoiser call of a batch-1 run, replayed (its inputs captured once)."""
        captured: list = []
        self.sample(self.calibration_obs(1), None, 0, capture=captured)
        args, kwargs = captured[0]
        call = getattr(self.step_owner(), self.step_attr)

        def one_call():
            with torch.no_grad(), self.protected():
                return call(*args, **kwargs)

        return one_call


class XVLAAdapter(LerobotAdapter):
    """lerobot's ``XVLAPolicy``: a Florence-2 encoder once per call, then K Euler steps of its soft-prompted
    transformer (``generate_actions``). Blocks: ``model.transformer.blocks.*.{attn,mlp}``, pre-norm residual
    branches (``x = x + attn(norm1(x)); x = x + mlp(norm2(x))``). Steps: ``model.transformer.forward``."""

    kind, t_arg = "xvla", "t"

    def __init__(self, policy, obs_dims, **kw):
        cfg = policy.config
        super().__init__(policy, obs_dims, cfg.max_state_dim, policy.model.dim_action, cfg.chunk_size,
                         cfg.num_denoising_steps, **kw)
        self.cache_blocks = ["model.transformer.blocks.*.{attn,mlp}"]

    def step_owner(self):
        return self.module.model.transformer

    def generate(self, state, image):
        B = state.shape[0]
        return self.module.model.generate_actions(
            input_ids=torch.tensor([TASK_TOKENS]).expand(B, -1), image_input=image[:, None],
            image_mask=torch.ones(B, 1, dtype=torch.bool), domain_id=torch.zeros(B, dtype=torch.long),
            proprio=state, steps=self.num_steps)


class SmolVLAAdapter(LerobotAdapter):
    """lerobot's ``SmolVLAPolicy``: the VLM prefix (image, instruction, state) fills a KV cache once per call, then
    K Euler steps of the action expert (``VLAFlowMatching.sample_actions`` -> ``denoise_step``).

    The expert layer's forward is inlined in ``SmolVLMWithExpertModel.forward``, so its cacheable branches are the
    modules it calls: ``lm_expert.layers.N.self_attn.o_proj`` (the attention branch's last op; q/k/v and the
    attention itself run every step, so reusing it saves only the projection) and ``lm_expert.layers.N.mlp``.
    That code adds the residual into the branch output in place (``out_emb += hidden_states``), which would
    change a cached tensor; during our runs a forward hook on those modules hands the caller a copy
    (``protected``), added for the run and removed after it. Steps: ``model.denoise_step``."""

    kind, step_attr = "smolvla", "denoise_step"

    def __init__(self, policy, obs_dims, **kw):
        cfg = policy.config
        super().__init__(policy, obs_dims, cfg.max_state_dim, cfg.max_action_dim, cfg.chunk_size, cfg.num_steps,
                         image_size=cfg.resize_imgs_with_padding[0], **kw)
        vwe = policy.model.vlm_with_expert
        every = vwe.num_vlm_layers // vwe.num_expert_layers
        prefix = "model.vlm_with_expert.lm_expert.layers"
        blocks = {}
        for j in range(vwe.num_expert_layers):
            i = j * every  # the VLM layer this expert layer runs beside
            self_attn = "cross" not in vwe.attention_mode or (vwe.self_attn_every_n_layers > 0 and
                                                              i % vwe.self_attn_every_n_layers == 0)
            blocks[f"{prefix}.{j}.self_attn.o_proj"] = "attn" if self_attn else "cross_attn"
            blocks[f"{prefix}.{j}.mlp"] = "ffn"
        self.cache_blocks = blocks
        self._protect = [policy.get_submodule(name) for name in blocks]

    def step_owner(self):
        return self.module.model

    @contextmanager
    def protected(self):
        handles = [m.register_forward_hook(lambda _m, _a, out: out.clone()) for m in self._protect]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def generate(self, state, image):
        B = state.shape[0]
        tokens = torch.tensor([TASK_TOKENS]).expand(B, -1)
        return self.module.model.sample_actions(
            images=[image * 2 - 1], img_masks=[torch.ones(B, dtype=torch.bool)],  # SigLIP's [-1, 1], as lerobot's
            lang_tokens=tokens, lang_masks=torch.ones_like(tokens, dtype=torch.bool), state=state)


class GrootHeadAdapter(LerobotAdapter):
    """GR00T N1.5's flow-matching action head alone (``FlowmatchingActionHead.get_action``): K Euler steps of a
    DiT over [state, future, action] tokens cross-attending to backbone tokens. The Eagle VLM backbone is not
    built; its tokens are stood in for by a fixed random projection of the image's 8x8 patches. Blocks:
    ``model.transformer_blocks.*.{attn1,ff}`` (attn1 is cross-attention in even blocks, self-attention in odd
    ones). Steps: ``model.forward`` of the DiT."""

    kind = "groot"

    def __init__(self, head, obs_dims, image_size: int = 32, **kw):
        cfg = head.config
        super().__init__(head, obs_dims, cfg.max_state_dim, cfg.action_dim, cfg.action_horizon,
                         cfg.num_inference_timesteps, image_size=image_size, **kw)
        dit = head.model.config
        self.cache_blocks = {f"model.transformer_blocks.{i}.attn1":
                             "attn" if (i % 2 == 1 and dit.interleave_self_attention) else "cross_attn"
                             for i in range(dit.num_layers)}
        self.cache_blocks["model.transformer_blocks.*.ff"] = "ffn"
        g = torch.Generator().manual_seed(0)
        self._patch_proj = torch.randn(3 * 64, cfg.backbone_embedding_dim, generator=g) / (3 * 64) ** 0.5

    def step_owner(self):
        return self.module.model

    def generate(self, state, image):
        from transformers.feature_extraction_utils import BatchFeature

        B = state.shape[0]
        patches = image.unfold(2, 8, 8).unfold(3, 8, 8).permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 3 * 64)  # (B, P, 192)
        backbone = BatchFeature(data={"backbone_features": patches @ self._patch_proj})  # (B, P, D_backbone)
        action_input = BatchFeature(data={"state": state[:, None], "embodiment_id": torch.zeros(B, dtype=torch.long)})
        return self.module.get_action(backbone, action_input)["action_pred"]


def _xvla(obs_dims, action_dim, horizon, num_steps, workdir, seed):
    return XVLAAdapter(tiny_xvla(sum(obs_dims.values()), action_dim, horizon, num_steps, seed=seed), obs_dims)


def _smolvla(obs_dims, action_dim, horizon, num_steps, workdir, seed):
    if workdir is None:
        raise ValueError("smolvla needs workdir=<a folder> for its local tiny SmolVLM config and tokenizer")
    policy = tiny_smolvla(os.path.join(workdir, "tiny_smolvlm"), sum(obs_dims.values()), action_dim, horizon,
                          num_steps, seed=seed)
    return SmolVLAAdapter(policy, obs_dims)


def _groot(obs_dims, action_dim, horizon, num_steps, workdir, seed):
    return GrootHeadAdapter(tiny_groot_head(sum(obs_dims.values()), action_dim, horizon, num_steps, seed=seed),
                            obs_dims)


ADAPTERS: dict[str, Callable[..., LerobotAdapter]] = {"xvla": _xvla, "smolvla": _smolvla, "groot": _groot}


def make_adapter(name: str, obs_dims: Mapping[str, int] | None = None, action_dim: int = 2, horizon: int = 8,
                 num_steps: int = 10, workdir: str | None = None, seed: int = 0) -> LerobotAdapter:
    """A tiny random-init lerobot model of kind ``name`` (``ADAPTERS``) behind its adapter, built offline.
    ``obs_dims``: the low-dim observation keys and their widths, in state order (default: the toy env's)."""
    if name not in ADAPTERS:
        raise ValueError(f"unknown lerobot adapter {name!r}; known: {sorted(ADAPTERS)}")
    obs_dims = {"agent_pos": 2, "goal_pos": 2} if obs_dims is None else dict(obs_dims)
    return ADAPTERS[name](obs_dims, action_dim, horizon, num_steps, workdir, seed)


def enable_cache(adapter: LerobotAdapter, cache, profile: bool = False) -> CacheEngine:
    """Attach an engine running ``cache`` (a Schedule, a Strategy or None) and point the predictor at it."""
    engine = attach_to(adapter, cache, profile=profile)
    adapter.step_cursor = engine
    return engine


def disable_cache(adapter: LerobotAdapter, engine: CacheEngine) -> None:
    engine.detach()
    adapter.step_cursor = None
