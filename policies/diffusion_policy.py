"""Transformer Diffusion Policy (DP-T): a pure action-chunk predictor.

``predict_action(obs)`` maps an observation history to an action chunk and keeps no state between calls:
observation history, action queues and timing belong to the control runtime (``bac.runtime``).

Shapes: B batch, To obs steps, T horizon, Ta executed actions, Da action dim, Do obs feature dim.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from bac.sampling import denoise
from policies.normalizer import Normalizer
from policies.transformer_for_diffusion import TransformerForDiffusion

SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}


@dataclass
class DPTConfig:
    """Everything needed to rebuild a DP-T policy; saved as JSON next to its weights."""

    obs_keys: list[str]
    obs_dims: list[int]
    action_dim: int
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    n_layer: int = 8
    n_head: int = 4
    n_emb: int = 128
    p_drop_emb: float = 0.0
    p_drop_attn: float = 0.1
    causal_attn: bool = True
    num_train_timesteps: int = 100
    num_inference_steps: int = 100
    scheduler: str = "ddpm"
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    policy_type: str = field(default="dpt")

    def __post_init__(self):
        if len(self.obs_keys) != len(self.obs_dims) or not self.obs_keys:
            raise ValueError(f"obs_keys {self.obs_keys} and obs_dims {self.obs_dims} must be non-empty and the same length")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is unknown; choose one of {sorted(SCHEDULERS)}")
        if not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be in [1, num_train_timesteps={self.num_train_timesteps}], "
                f"got {self.num_inference_steps}"
            )
        if self.scheduler == "ddpm" and self.num_inference_steps != self.num_train_timesteps:
            raise ValueError(
                f"DDPM samples with all {self.num_train_timesteps} training steps; for "
                f"{self.num_inference_steps} steps use scheduler='ddim'"
            )
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"n_obs_steps - 1 + n_action_steps ({self.n_obs_steps - 1 + self.n_action_steps}) "
                f"exceeds the horizon ({self.horizon})"
            )

    @property
    def obs_dim(self) -> int:
        return sum(self.obs_dims)


class DiffusionTransformerPolicy(nn.Module):
    """DP-T with epsilon prediction over a diffusers noise scheduler and dataset-fitted normalization."""

    def __init__(self, config: DPTConfig, normalizer: Normalizer | None = None):
        super().__init__()
        self.config = config
        c = config
        self.model = TransformerForDiffusion(
            input_dim=c.action_dim,
            output_dim=c.action_dim,
            horizon=c.horizon,
            n_obs_steps=c.n_obs_steps,
            cond_dim=c.obs_dim,
            n_layer=c.n_layer,
            n_head=c.n_head,
            n_emb=c.n_emb,
            p_drop_emb=c.p_drop_emb,
            p_drop_attn=c.p_drop_attn,
            causal_attn=c.causal_attn,
        )
        self.noise_scheduler = self.make_scheduler(c.scheduler)
        self.normalizer = normalizer
        # A cache engine or step recorder that the sampler announces (k, t) to; set from outside.
        self.step_cursor = None

    def make_scheduler(self, name: str):
        c = self.config
        return SCHEDULERS[name](
            num_train_timesteps=c.num_train_timesteps,
            beta_schedule=c.beta_schedule,
            clip_sample=c.clip_sample,
            prediction_type="epsilon",
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------- inference
    def check_obs(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Validate an observation dict and concatenate it to (B, To, Do) in ``obs_keys`` order."""
        c = self.config
        missing = [k for k in c.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; the policy needs {c.obs_keys}, got {sorted(obs)}")
        parts = []
        for key, dim in zip(c.obs_keys, c.obs_dims):
            x = torch.as_tensor(obs[key])
            if x.ndim != 3 or x.shape[1] != c.n_obs_steps or x.shape[2] != dim:
                raise ValueError(f"observation {key!r} must have shape (B, {c.n_obs_steps}, {dim}), got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"observation {key!r} holds NaN or inf")
            parts.append(x.to(self.device, torch.float32))
        return torch.cat(parts, dim=-1)

    @torch.inference_mode()
    def predict_action(
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """obs[key]: (B, To, d_key) -> {"action": (B, Ta, Da), "action_pred": (B, T, Da)}, unnormalized.

        ``action`` is the part of the predicted trajectory to execute: steps To-1 .. To-1+Ta-1, i.e. it
        starts at the current observation's time step.
        """
        if self.normalizer is None:
            raise RuntimeError("policy has no normalizer; load it from a checkpoint or call set_normalizer")
        c = self.config
        cond = self.normalizer.normalize("obs", self.check_obs(obs))  # (B, To, Do)
        B = cond.shape[0]
        # What does not change across denoising steps is computed once per chunk: the observation
        # tokens and the time tokens of all K steps.
        obs_tokens = self.model.encode_obs(cond)  # (B, To, n_emb)
        self.noise_scheduler.set_timesteps(c.num_inference_steps, device=self.device)
        time_tokens = self.model.encode_time(self.noise_scheduler.timesteps)  # (K, 1, n_emb)
        memory = self.model.memory(obs_tokens, time_tokens)  # (K, B, 1 + To, n_emb)
        noise = torch.randn((B, c.horizon, c.action_dim), generator=generator, device=self.device)
        # K memory views made at once, and the per-step modules looked up once (see TransformerForDiffusion.denoiser)
        naction = denoise(
            self.model.denoiser(memory.unbind(0)),
            self.noise_scheduler,
            noise,
            c.num_inference_steps,
            generator=generator,
            cursor=self.step_cursor,
        )
        action_pred = self.normalizer.unnormalize("action", naction.clamp(-1.0, 1.0))
        start = c.n_obs_steps - 1
        return {"action": action_pred[:, start : start + c.n_action_steps], "action_pred": action_pred}

    # ---------------------------------------------------------------- training
    def compute_loss(self, nobs: torch.Tensor, naction: torch.Tensor) -> torch.Tensor:
        """Epsilon-prediction MSE on normalized data: nobs (B, To, Do), naction (B, T, Da)."""
        B = naction.shape[0]
        noise = torch.randn_like(naction)
        t = torch.randint(0, self.config.num_train_timesteps, (B,), device=naction.device)
        noisy = self.noise_scheduler.add_noise(naction, noise, t)
        return nn.functional.mse_loss(self.model(noisy, t, nobs), noise)

    def set_normalizer(self, normalizer: Normalizer) -> None:
        self.normalizer = normalizer

    def config_dict(self) -> dict:
        return asdict(self.config)
