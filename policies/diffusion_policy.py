"""Transformer Diffusion Policy (DP-T): a pure action-chunk predictor.

``predict_action(obs)`` maps an observation history to an action chunk and keeps no state between calls:
observation history, action queues and timing belong to the control runtime (``bac.runtime``).

Shapes: B batch, To obs steps, T horizon, Ta executed actions, Da action dim, Do obs feature dim.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from torch import nn

from bac.sampling import denoise
from policies.normalizer import Normalizer
from policies.transformer_for_diffusion import TransformerForDiffusion

# The samplers a DP-T trained with DDPM's epsilon objective can run, any step count K <= num_train_timesteps:
# ancestral DDPM (strided below the training steps), DDIM (eta 0) and two second-order multistep solvers.
SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmsolver": DPMSolverMultistepScheduler,
              "unipc": UniPCMultistepScheduler}


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
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(
                f"n_obs_steps - 1 + n_action_steps ({self.n_obs_steps - 1 + self.n_action_steps}) "
                f"exceeds the horizon ({self.horizon})"
            )

    @property
    def obs_dim(self) -> int:
        return sum(self.obs_dims)

    def obs_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """Per observation key, the shape one env step gives (a flat vector of its dimension)."""
        return {k: (d,) for k, d in zip(self.obs_keys, self.obs_dims)}


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
        common = {"num_train_timesteps": c.num_train_timesteps, "beta_schedule": c.beta_schedule,
                  "prediction_type": "epsilon"}
        if name in ("ddpm", "ddim"):
            return SCHEDULERS[name](**common, clip_sample=c.clip_sample)
        # The multistep solvers have no clip_sample; dynamic thresholding with a maximum of 1 clamps the x0
        # prediction to [-1, 1] exactly as DDPM's clip does (the quantile is clamped to [1, sample_max_value]).
        # DPM-Solver++ (2M) and UniPC (bh2) are the data-prediction forms diffusers recommends for guided and
        # few-step sampling. Trailing spacing starts at the last training step (pure noise) and never repeats a
        # timestep: diffusers' default linspace rounds to a repeated step at K = num_train_timesteps, where the
        # solver's step size is zero and its output NaN.
        return SCHEDULERS[name](**common, thresholding=c.clip_sample, sample_max_value=1.0, solver_order=2,
                                timestep_spacing="trailing")

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
        self, obs: dict[str, torch.Tensor], generator: torch.Generator | None = None,
        init_action: torch.Tensor | None = None, init_step: int = 0,
    ) -> dict[str, torch.Tensor]:
        """obs[key]: (B, To, d_key) -> {"action": (B, Ta, Da), "action_pred": (B, T, Da)}, unnormalized.

        ``action`` is the part of the predicted trajectory to execute: steps To-1 .. To-1+Ta-1, i.e. it
        starts at the current observation's time step.

        Warm start: with ``init_step`` = k0 > 0, ``init_action`` (B, T, Da), unnormalized, is a guess of the
        trajectory (the runtime passes the previous chunk's remainder, shifted); it is noised to step k0's
        level with the noise that a cold start would begin from and only steps k0 .. K-1 run (SDEdit-style).
        ``init_step`` 0 is the cold start, whatever ``init_action`` holds.
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
        if init_step:
            noise = self.warm_start(init_action, noise, init_step)
        # K memory views made at once, and the per-step modules looked up once (see TransformerForDiffusion.denoiser)
        naction = denoise(
            self.model.denoiser(memory.unbind(0)),
            self.noise_scheduler,
            noise,
            c.num_inference_steps,
            generator=generator,
            cursor=self.step_cursor,
            start=init_step,
        )
        if not torch.isfinite(naction).all():  # one check per chunk: a NaN must never reach a robot
            raise FloatingPointError(
                f"the sampled actions hold NaN or inf ({c.scheduler}, K={c.num_inference_steps}); the observation "
                "may be far outside the training range, or the sampler unstable at this step count")
        action_pred = self.normalizer.unnormalize("action", naction.clamp(-1.0, 1.0))
        start = c.n_obs_steps - 1
        return {"action": action_pred[:, start : start + c.n_action_steps], "action_pred": action_pred}

    def warm_start(self, init_action: torch.Tensor | None, noise: torch.Tensor, init_step: int) -> torch.Tensor:
        """x at step ``init_step``'s noise level from a guessed trajectory (B, T, Da), unnormalized."""
        c = self.config
        if not 0 < init_step < c.num_inference_steps:
            raise ValueError(f"init_step must be in [0, num_inference_steps={c.num_inference_steps}), got {init_step}")
        if init_action is None or tuple(init_action.shape) != tuple(noise.shape):
            got = None if init_action is None else tuple(init_action.shape)
            raise ValueError(f"a warm start needs init_action of shape {tuple(noise.shape)} (B, T, Da), got {got}")
        init = torch.as_tensor(init_action, dtype=torch.float32, device=self.device)
        if not torch.isfinite(init).all():
            raise ValueError("init_action holds NaN or inf")
        x0 = self.normalizer.normalize("action", init).clamp(-1.0, 1.0)
        t = self.noise_scheduler.timesteps[init_step : init_step + 1]
        return self.noise_scheduler.add_noise(x0, noise, t)

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

    def cache_target(self, checkpoint=".", obs: dict | None = None):
        """This policy as ``bac.protocol.CacheTarget`` (``policies.cache_target.DPTCacheTarget``)."""
        from policies.cache_target import DPTCacheTarget

        return DPTCacheTarget(self, checkpoint, obs)

    def config_dict(self) -> dict:
        return asdict(self.config)
