"""A small vision-language-action policy (VLA) with the structure of pi0 / GR00T, sized for a CPU.

Prefix (computed once per action chunk): one conv encoder per camera turns each 84 px image of the last
``n_obs_steps`` steps into ``vision_grid**2`` tokens; the instruction becomes frozen text-encoder tokens
(``policies.text_encoder``, encoded once per distinct instruction); the proprioceptive state is one token per
step; with ``object_keys``, each object of the scene (``object_<name>``, envs/objects.py) is one more token at the
latest step, and the objects a task lacks are masked out. Learned type/position embeddings, then
``n_prefix_layers`` transformer layers over the whole prefix.

Action expert (run at every denoising step): DP-T's pre-norm decoder layers (``policies.transformer_for_diffusion``:
``sa_block``, ``ca_block``, ``ff_block`` residual branches, which the cache engine wraps from outside) over the
``horizon`` action tokens, the diffusion time added to every action token, cross-attention to the prefix. Trained
with flow matching (``objective="flow"``, pi0's velocity target, about 10 Euler steps) or DDPM's epsilon objective
(``"ddpm"``, sampled by DDPM or DDIM).

Prefix reuse within a chunk: the prefix does not change across the K denoising steps, so its keys and values in
every expert layer are projected once per chunk (``reuse_prefix_kv=True``, the default; ``False`` projects them
at every step, as a model without this would). Both give the same numbers.

``predict_action(obs)`` is a pure chunk predictor, like DP-T's: ``obs[<camera>_image]`` (B, To, H, W, 3) uint8,
``obs[<state key>]`` (B, To, d), any of ``obs[<object key>]`` (B, To, d), ``obs["instruction"]`` (B, To) or (B,)
text (the last step's is used)
-> ``{"action": (B, Ta, Da), "action_pred": (B, T, Da)}``.

Shapes: B batch, To obs steps, T horizon, Ta executed actions, Da action dim, S prefix tokens, E = n_emb.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import nn

from bac.engine import fingerprint
from bac.modcall import bind, needs_module_call
from bac.protocol import Signature
from bac.sampling import denoise
from policies.cache_target import calib_obs_path, saved_calibration
from policies.normalizer import Normalizer
from policies.text_encoder import TEXT_ENCODERS, TextCache, text_encoder
from policies.transformer_for_diffusion import Attention, DecoderLayer, SinusoidalPosEmb, TransformerForDiffusion

OBJECTIVES = {"flow": ("flow",), "ddpm": ("ddpm", "ddim")}  # objective -> the samplers it can run
FLOW_TIMESTEPS = 1000  # diffusers' flow-matching timesteps are sigma * 1000


@dataclass
class VLAConfig:
    """Everything needed to rebuild a VLA policy; saved as JSON next to its weights."""

    action_dim: int = 7
    cameras: list[str] = field(default_factory=lambda: ["agentview", "robot0_eye_in_hand"])
    image_size: int = 84
    state_keys: list[str] = field(default_factory=lambda: ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"])
    state_dims: list[int] = field(default_factory=lambda: [3, 4, 2])
    # keys whose width differs across the tasks of a multi-task checkpoint: state_dims holds the widest, and a
    # narrower observation is zero-padded at its end (e.g. ``object``: 10-d on Lift, 14-d on Can)
    padded_state_keys: list[str] = field(default_factory=list)
    # one prefix token per object: named per-object observation keys (``object_<name>``, envs/objects.py), each
    # with its own projection, read at the latest step. An observation holds a task's own objects (any subset of
    # these keys, at least one); the absent ones are masked out of the prefix and the expert's cross-attention, so
    # the can of Can and of PickPlace is one token in a multi-task checkpoint.
    object_keys: list[str] = field(default_factory=list)
    object_dims: list[int] = field(default_factory=list)
    # what the image tokens attend to in the prefix layers: "all" tokens, or only the "images" (text, state and
    # object tokens still attend to everything). With "images" an image token's output is a function of the images
    # alone, so keeping it across control steps (TokenReuse) cannot carry an old robot state, as VLA-Cache's causal
    # prompt (images before text) cannot.
    image_attention: str = "all"
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    text_encoder: str = "minilm"
    max_text_tokens: int = 16
    vision_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    vision_grid: int = 4  # tokens per image: vision_grid ** 2
    n_image_steps: int = 1  # images of the last this many of the n_obs_steps (pi0 looks at the current frame only)
    n_emb: int = 192
    n_head: int = 4
    n_prefix_layers: int = 2
    n_layer: int = 6  # expert layers (5.1M parameters in all with these defaults)
    p_drop: float = 0.1
    objective: str = "flow"
    num_train_timesteps: int = 100  # DDPM's; flow matching trains on continuous time
    beta_schedule: str = "squaredcos_cap_v2"
    scheduler: str = "flow"
    num_inference_steps: int = 10
    policy_type: str = field(default="vla")

    def __post_init__(self):
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {self.objective!r}")
        if self.scheduler not in OBJECTIVES[self.objective]:
            raise ValueError(f"a {self.objective} policy samples with {OBJECTIVES[self.objective]}, not {self.scheduler!r}")
        if self.objective == "ddpm" and not 1 <= self.num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}], got {self.num_inference_steps}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if len(self.state_keys) != len(self.state_dims) or not self.cameras:
            raise ValueError("state_keys and state_dims must have the same length, and cameras must not be empty")
        if len(self.object_keys) != len(self.object_dims) or set(self.object_keys) & set(self.state_keys):
            raise ValueError(f"object_keys {self.object_keys} need one width each ({self.object_dims}) and must not "
                             f"be state keys {self.state_keys}")
        if self.image_attention not in ("all", "images"):
            raise ValueError(f"image_attention must be 'all' or 'images', got {self.image_attention!r}")
        unknown = [k for k in self.padded_state_keys if k not in self.state_keys]
        if unknown:
            raise ValueError(f"padded_state_keys {unknown} are not state keys {self.state_keys}")
        if not 1 <= self.n_image_steps <= self.n_obs_steps:
            raise ValueError(f"n_image_steps must be in [1, n_obs_steps={self.n_obs_steps}], got {self.n_image_steps}")
        if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
            raise ValueError(f"n_obs_steps - 1 + n_action_steps exceeds the horizon ({self.horizon})")

    @property
    def state_dim(self) -> int:
        return sum(self.state_dims)

    @property
    def n_image_tokens(self) -> int:
        return self.n_image_steps * len(self.cameras) * self.vision_grid ** 2

    @property
    def n_prefix_tokens(self) -> int:
        """S: text, image, state and object tokens."""
        return self.max_text_tokens + self.n_image_tokens + self.n_obs_steps + len(self.object_keys)

    def obs_shapes(self) -> dict[str, tuple[int, ...] | None]:
        """Per observation key, the shape one env step gives (None: text)."""
        shapes = {f"{c}_image": (self.image_size, self.image_size, 3) for c in self.cameras}
        shapes.update({k: (d,) for k, d in zip(self.state_keys, self.state_dims)})
        return {**shapes, "instruction": None}

    def optional_obs_shapes(self) -> dict[str, tuple[int, ...]]:
        """The object keys (an observation holds at least one): key -> the shape one env step gives."""
        return {k: (d,) for k, d in zip(self.object_keys, self.object_dims)}

    @property
    def obs_keys(self) -> list[str]:
        """Every observation key the policy needs (the object keys, of which any may be absent, aside)."""
        return [f"{c}_image" for c in self.cameras] + list(self.state_keys) + ["instruction"]


class VisionEncoder(nn.Module):
    """(N, H, W, 3) uint8 -> (N, grid**2, E): three stride-2 convolutions, average-pooled to a grid of tokens."""

    def __init__(self, channels: list[int], grid: int, n_emb: int):
        super().__init__()
        layers, c_in = [], 3
        for i, c in enumerate(channels):
            k = 5 if i == 0 else 3
            layers += [nn.Conv2d(c_in, c, k, stride=2, padding=k // 2), nn.GroupNorm(8, c), nn.SiLU()]
            c_in = c
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid))
        self.proj = nn.Linear(c_in, n_emb)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W) in [-1, 1]
        return self.proj(self.net(x).flatten(2).transpose(1, 2))


class PrefixAttention(Attention):
    """Cross-attention whose context may be given as keys and values already projected (``project_kv``)."""

    def project_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S, E) -> keys and values (B, heads, S, E / heads)."""
        B, S, C = context.shape
        k, v = F.linear(context, self.in_proj_weight[C:], self.in_proj_bias[C:]).chunk(2, dim=-1)
        h = self.n_head
        return k.view(B, S, h, C // h).transpose(1, 2), v.view(B, S, h, C // h).transpose(1, 2)

    def forward(self, x, context, mask):
        k, v = self.project_kv(context) if isinstance(context, torch.Tensor) else context
        B, T, C = x.shape
        h = self.n_head
        q = F.linear(x, self.in_proj_weight[:C], self.in_proj_bias[:C]).view(B, T, h, C // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p_drop if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class ExpertLayer(DecoderLayer):
    """DP-T's decoder layer with a cross-attention that takes per-layer prefix keys/values."""

    def __init__(self, n_emb: int, n_head: int, p_drop: float):
        super().__init__(n_emb, n_head, p_drop)
        self.multihead_attn = PrefixAttention(n_emb, n_head, p_drop)


class ActionExpert(nn.Module):
    """The denoiser: noisy actions (B, T, Da), time, prefix -> the objective's target (velocity or noise)."""

    cache_blocks = "layers.*.{sa_block,ca_block,ff_block}"

    def __init__(self, action_dim: int, horizon: int, n_layer: int, n_emb: int, n_head: int, p_drop: float):
        super().__init__()
        self.horizon = horizon
        self.input_emb = nn.Linear(action_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.randn(1, horizon, n_emb) * 0.02)
        self.time_emb = nn.Sequential(SinusoidalPosEmb(n_emb), nn.Linear(n_emb, 4 * n_emb), nn.Mish(),
                                      nn.Linear(4 * n_emb, n_emb))
        self.layers = nn.ModuleList([ExpertLayer(n_emb, n_head, p_drop) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, action_dim)
        self.apply(TransformerForDiffusion._init_weights)  # DP-T's init (its Attention's packed weights start empty)

    def prefix_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every layer's cross-attention keys and values of the prefix (B, S, E): once per chunk."""
        return [layer.multihead_attn.project_kv(memory) for layer in self.layers]

    def _per_layer(self, memory) -> list:
        """``prefix_kv``'s list as it is, or the prefix (B, S, E) once per layer."""
        return memory if isinstance(memory, list) else [memory] * len(self.layers)

    def denoiser(self, memory, memory_mask, timesteps: torch.Tensor):
        """``f(x, t, k)`` for one sampling run over ``timesteps`` (K,): the same ops as ``self(x, t, memory,
        memory_mask)``, with the K time embeddings computed at once and the modules used at every step looked up
        once (``bac.modcall.bind``; with cached blocks, module-call overhead is a visible share of a CPU step)."""
        if self.training or needs_module_call(self):
            return lambda x, t, k: self(x, t, memory, memory_mask)
        t_emb = self.time_emb(timesteps.float().reshape(-1))[:, None]  # (K, 1, E)
        input_emb, ln_f, head = bind(self.input_emb), bind(self.ln_f), bind(self.head)
        layers = [bind(layer) for layer in self.layers]
        kv = self._per_layer(memory)
        pos = self.pos_emb

        def step(x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:
            h = input_emb(x) + pos[:, : x.shape[1]] + t_emb[k]
            for layer, mem in zip(layers, kv):
                h = layer(h, mem, None, memory_mask)
            return head(ln_f(h))

        return step

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float, memory, memory_mask=None) -> torch.Tensor:
        """``memory``: the prefix (B, S, E), or ``prefix_kv``'s per-layer keys and values; ``memory_mask``:
        additive (B, 1, 1, S), -inf on padding."""
        B = sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device, dtype=torch.float32).reshape(-1).expand(B)  # (B,)
        x = self.input_emb(sample) + self.pos_emb[:, : sample.shape[1]] + self.time_emb(t)[:, None]
        for layer, mem in zip(self.layers, self._per_layer(memory)):
            x = layer(x, mem, None, memory_mask)
        return self.head(self.ln_f(x))


class TokenReuse:
    """Reuse of prefix tokens across consecutive control steps (VLA-Cache's idea), held by the caller per stream.

    The prefix is recomputed at every chunk, but most of the camera image is the same as at the previous chunk.
    An image token whose cell (its ``image_size / vision_grid`` pixels square) changed by at most ``threshold``
    (mean absolute pixel difference, 0-255, against the frame the token was last computed from) keeps its
    keys/values in every prefix layer and its output from the stream's previous call; the changed image tokens,
    image tokens kept ``max_age`` calls in a row, and every text and state token (they read the images, as the
    text after the image in VLA-Cache's causal prompt) are recomputed, attending to all tokens. An approximation:
    a kept token's output does not see what changed elsewhere. This prefix is bidirectional (image tokens attend to
    the state tokens, unlike VLA-Cache's causal one), so a kept image token's output also carries the robot state
    of the call that computed it: in closed loop on Lift threshold 4 took success from 39/50 to 0/50 (session 14)
    and from 49/50 to 7/50 on the Lift VLA (session 16, docs/vla.md). With ``VLAConfig.image_attention="images"`` the image tokens see only the
    images, so a kept one cannot carry an old state (tested: unchanged images, a moved robot, the plain prefix's
    actions); in closed loop on Lift such a VLA keeps its success with reuse (docs/vla.md, session 16).
    ``threshold < 0`` recomputes every token at every call (the exactness check).

    ``states`` maps a stream id to what its last call left (a batch with a new id or another instruction
    recomputes everything), the ``max_streams`` most recently used only (the loop gives each episode its own
    stream id, so a long run would otherwise keep every episode's); ``recomputed`` / ``offered`` count image
    tokens over all calls.
    """

    def __init__(self, threshold: float, max_age: int | None = None, max_streams: int = 256):
        if max_age is not None and max_age < 1:
            raise ValueError(f"max_age must be >= 1 or None, got {max_age}")
        if max_streams < 1:
            raise ValueError(f"max_streams must be >= 1, got {max_streams}")
        self.threshold, self.max_age, self.max_streams = float(threshold), max_age, max_streams
        self.states: dict = {}
        self.recomputed = self.offered = 0

    @property
    def recompute_fraction(self) -> float:
        return self.recomputed / self.offered if self.offered else 1.0


def _prefix_layer_subset(layer: nn.TransformerEncoderLayer, x: torch.Tensor, idx: torch.Tensor, k_all: torch.Tensor,
                         v_all: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pre-norm encoder layer for the tokens ``idx`` only: x (B, D, E) their inputs; k_all, v_all
    (B, heads, S, E / heads) every token's keys/values, the ``idx`` ones replaced here; mask additive (B, 1, 1, S),
    or (B, 1, D, S) with a row per token.
    -> (their outputs (B, D, E), keys, values)."""
    attn = layer.self_attn
    B, D, E = x.shape
    h = attn.num_heads
    q, k, v = F.linear(layer.norm1(x), attn.in_proj_weight, attn.in_proj_bias).view(B, D, 3, h, E // h).permute(2, 0, 3, 1, 4)
    k_all, v_all = k_all.clone(), v_all.clone()
    k_all[:, :, idx], v_all[:, :, idx] = k, v
    y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
    x = x + attn.out_proj(y.transpose(1, 2).reshape(B, D, E))
    x = x + layer.linear2(layer.activation(layer.linear1(layer.norm2(x))))
    return x, k_all, v_all


class VLAPolicy(nn.Module):
    """The VLA: ``predict_action`` for inference, ``compute_loss`` for training (see the module docstring)."""

    def __init__(self, config: VLAConfig, normalizer: Normalizer | None = None):
        super().__init__()
        self.config = c = config
        E = c.n_emb
        self.vision = nn.ModuleDict({cam: VisionEncoder(c.vision_channels, c.vision_grid, E) for cam in c.cameras})
        self.text_proj = nn.Linear(384, E)
        self.state_proj = nn.Linear(c.state_dim, E)
        self.text_pos = nn.Parameter(torch.randn(1, c.max_text_tokens, E) * 0.02)
        self.image_pos = nn.Parameter(torch.randn(1, c.n_image_tokens, E) * 0.02)
        self.state_pos = nn.Parameter(torch.randn(1, c.n_obs_steps, E) * 0.02)
        if c.object_keys:
            self.object_proj = nn.ModuleDict({k: nn.Linear(d, E) for k, d in zip(c.object_keys, c.object_dims)})
            self.object_pos = nn.Parameter(torch.randn(1, len(c.object_keys), E) * 0.02)
        layer = nn.TransformerEncoderLayer(E, c.n_head, 4 * E, c.p_drop, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.prefix = nn.TransformerEncoder(layer, c.n_prefix_layers, enable_nested_tensor=False)
        self.prefix_norm = nn.LayerNorm(E)
        self.expert = ActionExpert(c.action_dim, c.horizon, c.n_layer, E, c.n_head, c.p_drop)
        self.noise_scheduler = self.make_scheduler(c.scheduler)
        self.normalizer = normalizer
        self.step_cursor = None  # a cache engine or step recorder the sampler announces (k, t) to; set from outside
        self._text: TextCache | None = None

    def make_scheduler(self, name: str):
        c = self.config
        if name == "flow":
            return FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_TIMESTEPS, shift=1.0)
        cls = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler}[name]
        return cls(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                   prediction_type="epsilon", clip_sample=True)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def text(self) -> TextCache:
        if self._text is None:
            self._text = TextCache(text_encoder(self.config.text_encoder, self.config.max_text_tokens))
        return self._text

    # ---------------------------------------------------------------- observations
    def check_obs(self, obs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
        """Validate ``obs``: images (B, To, H, W, 3) uint8 per camera, state (B, To, Ds) float, B instructions."""
        c = self.config
        missing = [k for k in c.obs_keys if k not in obs]
        if missing:
            raise KeyError(f"observation is missing keys {missing}; the policy needs {c.obs_keys}, got {sorted(obs)}")
        images = {}
        for cam in c.cameras:
            x = torch.as_tensor(obs[f"{cam}_image"])
            want = (c.n_obs_steps, c.image_size, c.image_size, 3)
            if x.ndim != 5 or tuple(x.shape[1:]) != want or x.dtype != torch.uint8:
                raise ValueError(f"observation '{cam}_image' must be (B, {', '.join(map(str, want))}) uint8, "
                                 f"got {tuple(x.shape)} {x.dtype}")
            images[cam] = x.to(self.device)
        parts = []
        for key, dim in zip(c.state_keys, c.state_dims):
            x = torch.as_tensor(obs[key], dtype=torch.float32)
            if key in c.padded_state_keys and x.ndim == 3 and 0 < x.shape[2] < dim:
                x = torch.nn.functional.pad(x, (0, dim - x.shape[2]))
            if x.ndim != 3 or x.shape[1] != c.n_obs_steps or x.shape[2] != dim:
                up_to = " (or narrower: zero-padded)" if key in c.padded_state_keys else ""
                raise ValueError(f"observation {key!r} must have shape (B, {c.n_obs_steps}, {dim}){up_to}, "
                                 f"got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"observation {key!r} holds NaN or inf")
            parts.append(x.to(self.device))
        state = torch.cat(parts, dim=-1)
        text = np.asarray(obs["instruction"])
        if text.ndim == 2:
            text = text[:, -1]  # the latest step's instruction
        if text.ndim != 1 or text.dtype.kind not in "UO" or len(text) != state.shape[0]:
            raise ValueError(f"observation 'instruction' must be (B,) or (B, To) text for B={state.shape[0]}, "
                             f"got shape {text.shape} dtype {text.dtype}")
        return images, state, [str(t) for t in text]

    def check_objects(self, obs: dict, batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The object keys of ``obs`` at the latest step, normalized and side by side (B, sum of object_dims; zeros
        where absent), and which objects are present (B, n_objects); None for a policy without object tokens. A
        key the observation lacks is absent in every row; ``obs["object_present"]`` (B, n_objects) bool, when
        given, marks rows of a mixed batch whose task lacks a key it holds (zero-filled there)."""
        c = self.config
        if not c.object_keys:
            return None
        parts, present = [], []
        for key, dim in zip(c.object_keys, c.object_dims):
            if key not in obs:
                parts.append(torch.zeros(batch, dim, device=self.device))
                present.append(torch.zeros(batch, dtype=torch.bool, device=self.device))
                continue
            x = torch.as_tensor(obs[key], dtype=torch.float32)
            if x.ndim != 3 or x.shape[0] != batch or x.shape[1] != c.n_obs_steps or x.shape[2] != dim:
                raise ValueError(f"observation {key!r} must have shape ({batch}, {c.n_obs_steps}, {dim}), "
                                 f"got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise ValueError(f"observation {key!r} holds NaN or inf")
            parts.append(self.normalizer.normalize(key, x[:, -1].to(self.device)))
            present.append(torch.ones(batch, dtype=torch.bool, device=self.device))
        present = torch.stack(present, 1)
        if "object_present" in obs:
            given = torch.as_tensor(np.asarray(obs["object_present"]))
            if given.dtype != torch.bool or tuple(given.shape) != (batch, len(c.object_keys)):
                raise ValueError(f"observation 'object_present' must be ({batch}, {len(c.object_keys)}) bool (one "
                                 f"column per object key {c.object_keys}), got {tuple(given.shape)} {given.dtype}")
            present &= given.to(self.device)
        if not present.any(1).all():
            raise KeyError(f"observation holds none of the policy's object keys {c.object_keys} (in some rows), "
                           f"got {sorted(obs)}; an env's ``object`` splits into them with envs.objects.split_objects")
        dims = list(c.object_dims)
        x = torch.cat(parts, 1)
        mask = torch.repeat_interleave(present, torch.tensor(dims, device=self.device), dim=1)
        return x * mask, present

    def prefix_tokens(self, images: dict[str, torch.Tensor], nstate: torch.Tensor, texts: list[str],
                      objects: tuple[torch.Tensor, torch.Tensor] | None = None):
        """-> the prefix layers' input tokens (B, S, E) and which are kept (B, S) (False on text padding and on
        absent objects). ``objects``: ``check_objects``' normalized objects and their presence."""
        c = self.config
        B = nstate.shape[0]
        feats, mask = self.text(texts)  # (B, L, 384), (B, L)
        text_tokens = self.text_proj(feats.to(self.device)) + self.text_pos
        n = c.n_image_steps
        img = [self.vision[cam](images[cam][:, -n:].flatten(0, 1)).view(B, n, -1, c.n_emb) for cam in c.cameras]
        img_tokens = torch.stack(img, 2).flatten(1, 3) + self.image_pos  # (B, n_image_steps * cams * grid^2, E)
        state_tokens = self.state_proj(nstate) + self.state_pos
        parts = [text_tokens, img_tokens, state_tokens]
        keep = [mask.to(self.device), torch.ones(B, img_tokens.shape[1] + state_tokens.shape[1], dtype=torch.bool,
                                                 device=self.device)]
        if c.object_keys:
            if objects is None:
                raise ValueError(f"this policy reads object keys {c.object_keys}: pass check_objects' output")
            x, present = objects
            per_object = torch.split(x, list(c.object_dims), dim=1)
            parts.append(torch.stack([self.object_proj[k](o) for k, o in zip(c.object_keys, per_object)], 1)
                         + self.object_pos)
            keep.append(present)
        return torch.cat(parts, 1), torch.cat(keep, 1)

    def prefix_attention_mask(self) -> torch.Tensor | None:
        """(S, S) additive mask of the prefix layers (row: query): -inf where an image token would attend to a
        non-image token (``image_attention="images"``), else None."""
        c = self.config
        if c.image_attention == "all":
            return None
        S, img = c.n_prefix_tokens, slice(c.max_text_tokens, c.max_text_tokens + c.n_image_tokens)
        mask = torch.zeros(S, S, device=self.device)
        mask[img] = float("-inf")
        mask[img, img] = 0.0
        return mask

    def encode_prefix(self, images: dict[str, torch.Tensor], nstate: torch.Tensor, texts: list[str],
                      reuse: TokenReuse | None = None, streams=None, objects=None):
        """-> prefix (B, S, E), additive cross-attention mask (B, 1, 1, S) (-inf on text padding). With ``reuse``
        and one id per row in ``streams``: tokens kept from each stream's previous call (``TokenReuse``)."""
        tokens, keep = self.prefix_tokens(images, nstate, texts, objects)
        additive = torch.zeros(keep.shape, device=self.device).masked_fill(~keep, float("-inf"))[:, None, None]
        if reuse is None:
            block = self.prefix_attention_mask()
            if block is None:
                return self.prefix_norm(self.prefix(tokens, src_key_padding_mask=~keep)), additive
            S = tokens.shape[1]  # padding and the image block in one (B * heads, S, S) mask, as nn.MultiheadAttention takes it
            layers_mask = (additive.expand(-1, self.config.n_head, S, -1) + block).flatten(0, 1)
            return self.prefix_norm(self.prefix(tokens, mask=layers_mask)), additive
        return self.prefix_norm(self._reuse_prefix(tokens, additive, images, texts, reuse, streams)), additive

    def _reuse_prefix(self, tokens, additive, images, texts, reuse: TokenReuse, streams) -> torch.Tensor:
        """The prefix layers over the tokens ``reuse`` says changed; the others' keys/values and outputs from each
        stream's previous call. Updates ``reuse.states`` for ``streams``."""
        c = self.config
        B, S, E = tokens.shape
        if streams is None or len(streams) != B:
            raise ValueError(f"token reuse needs one stream id per batch row ({B}), got {streams!r}")
        n, g, T = c.n_image_steps, c.vision_grid, c.max_text_tokens
        frames = {cam: images[cam][:, -n:] for cam in c.cameras}  # (B, n, H, W, 3) uint8
        states = [reuse.states.get(s) for s in streams]
        warm = all(st is not None and st["text"] == t for st, t in zip(states, texts))
        dynamic = torch.ones(S, dtype=torch.bool, device=tokens.device)  # text and state: always recomputed
        img = slice(T, T + c.n_image_tokens)
        if warm:
            age = torch.stack([st["age"] for st in states])  # (B, S)
            refs = {cam: torch.stack([st["ref"][cam] for st in states]) for cam in c.cameras}
            change = torch.stack([  # mean |pixel change| per token cell, against the frame it was computed from
                F.adaptive_avg_pool2d((frames[cam].float() - refs[cam].float()).abs().mean(-1).flatten(0, 1)[:, None],
                                      g).view(B, n, g * g) for cam in c.cameras], 2).flatten(1)  # (B, image tokens)
            if reuse.threshold >= 0:
                dynamic[img] = (change > reuse.threshold).any(0)
                if reuse.max_age is not None:
                    dynamic[img] |= (age[:, img] >= reuse.max_age).any(0)
            kv = [(torch.stack([st["kv"][i][0] for st in states]), torch.stack([st["kv"][i][1] for st in states]))
                  for i in range(len(self.prefix.layers))]
            out = torch.stack([st["out"] for st in states])
        else:
            shape = (B, c.n_head, S, E // c.n_head)
            kv = [(tokens.new_zeros(shape), tokens.new_zeros(shape)) for _ in self.prefix.layers]
            out, age = tokens.new_zeros(B, S, E), torch.zeros(B, S, dtype=torch.long, device=tokens.device)
            refs = frames
        idx = dynamic.nonzero().squeeze(1)
        x = tokens[:, idx]
        block = self.prefix_attention_mask()
        rows = additive if block is None else additive + block[idx][None, None]  # (B, 1, 1 or D, S)
        for i, layer in enumerate(self.prefix.layers):
            x, k, v = _prefix_layer_subset(layer, x, idx, kv[i][0], kv[i][1], rows)
            kv[i] = (k, v)
        out = out.clone()
        out[:, idx] = x
        age = age + 1
        age[:, idx] = 0
        recomputed = dynamic[img]
        reuse.recomputed += B * int(recomputed.sum())
        reuse.offered += B * c.n_image_tokens
        # the recomputed cells' reference becomes this frame: the token mask upsampled to pixels, per camera
        cells = recomputed.view(n, len(c.cameras), g, g).transpose(0, 1).float()  # (cams, n, g, g)
        pixels = F.interpolate(cells, size=(c.image_size, c.image_size), mode="nearest").bool()[..., None]
        ref = {cam: torch.where(pixels[i], frames[cam], refs[cam]) for i, cam in enumerate(c.cameras)}
        for b, s in enumerate(streams):
            reuse.states.pop(s, None)  # re-inserted last: the dict's order is the streams' recency
            reuse.states[s] = {"text": texts[b], "ref": {cam: r[b] for cam, r in ref.items()},
                               "kv": [(k[b], v[b]) for k, v in kv], "out": out[b], "age": age[b]}
        while len(reuse.states) > reuse.max_streams:
            reuse.states.pop(next(iter(reuse.states)))
        return out

    # ---------------------------------------------------------------- inference
    @torch.inference_mode()
    def predict_action(self, obs: dict, generator: torch.Generator | None = None, reuse_prefix_kv: bool = True,
                       timings: dict | None = None, noise: torch.Tensor | None = None,
                       token_reuse: TokenReuse | None = None, streams=None) -> dict[str, torch.Tensor]:
        """-> ``{"action": (B, Ta, Da), "action_pred": (B, T, Da)}``, unnormalized. ``noise`` (B, T, Da) replaces
        the initial noise drawn from ``generator`` (which still drives a stochastic sampler's steps).
        ``token_reuse`` with ``streams`` (one id per row): prefix tokens kept across calls (``TokenReuse``; the
        caller owns that state, the policy keeps none).
        ``timings``, when given, gets
        ``prefix_s`` (vision, text, prefix layers and, with ``reuse_prefix_kv``, the expert's prefix keys/values)
        and ``expert_s`` (the K denoising steps)."""
        if self.normalizer is None:
            raise RuntimeError("policy has no normalizer; load it from a checkpoint or call set_normalizer")
        c = self.config
        t0 = time.perf_counter()
        images, state, texts = self.check_obs(obs)
        objects = self.check_objects(obs, state.shape[0])
        prefix, mask = self.encode_prefix(images, self.normalizer.normalize("state", state), texts, token_reuse, streams,
                                          objects)
        memory = self.expert.prefix_kv(prefix) if reuse_prefix_kv else prefix
        t1 = time.perf_counter()
        B = prefix.shape[0]
        if noise is None:
            noise = torch.randn((B, c.horizon, c.action_dim), generator=generator, device=self.device)
        elif tuple(noise.shape) != (B, c.horizon, c.action_dim):
            raise ValueError(f"noise must have shape {(B, c.horizon, c.action_dim)}, got {tuple(noise.shape)}")
        self.noise_scheduler.set_timesteps(c.num_inference_steps, device=self.device)
        step = self.expert.denoiser(memory, mask, self.noise_scheduler.timesteps)
        naction = denoise(step, self.noise_scheduler, noise, c.num_inference_steps, generator=generator,
                          cursor=self.step_cursor)
        if not torch.isfinite(naction).all():
            raise FloatingPointError(f"the sampled actions hold NaN or inf ({c.scheduler}, K={c.num_inference_steps})")
        action_pred = self.normalizer.unnormalize("action", naction.clamp(-1.0, 1.0))
        if timings is not None:
            timings.update(prefix_s=t1 - t0, expert_s=time.perf_counter() - t1)
        start = c.n_obs_steps - 1
        return {"action": action_pred[:, start: start + c.n_action_steps], "action_pred": action_pred}

    # ---------------------------------------------------------------- training
    def compute_loss(self, images: dict[str, torch.Tensor], nstate: torch.Tensor, texts: list[str],
                     naction: torch.Tensor, generator: torch.Generator | None = None, objects=None) -> torch.Tensor:
        """The objective's MSE on normalized data: images (B, To, H, W, 3) uint8, nstate (B, To, Ds),
        naction (B, T, Da); ``objects``: normalized objects (B, sum of object_dims) and presence (B, n_objects)."""
        prefix, mask = self.encode_prefix(images, nstate, texts, objects=objects)
        B = naction.shape[0]
        noise = torch.randn(naction.shape, generator=generator, device=naction.device)
        if self.config.objective == "flow":
            # pi0's time distribution: Beta(1.5, 1) leans to the noisy end, where the chunk's shape is decided
            beta = torch.distributions.Beta(torch.tensor(1.5), torch.tensor(1.0))
            sigma = (beta.sample((B,)) * 0.999 + 0.001).to(naction.device)
            noisy = sigma[:, None, None] * noise + (1 - sigma[:, None, None]) * naction
            target, t = noise - naction, sigma * FLOW_TIMESTEPS
        else:
            t = torch.randint(0, self.config.num_train_timesteps, (B,), device=naction.device, generator=generator)
            noisy, target = self.noise_scheduler.add_noise(naction, noise, t), noise
        return F.mse_loss(self.expert(noisy, t, prefix, mask), target)

    def set_normalizer(self, normalizer: Normalizer) -> None:
        self.normalizer = normalizer

    def config_dict(self) -> dict:
        return asdict(self.config)

    def cache_target(self, checkpoint=None, obs: dict | None = None) -> "VLACacheTarget":
        """This policy as ``bac.protocol.CacheTarget`` (the engine on the action expert)."""
        return VLACacheTarget(self, checkpoint, obs)


class VLACacheTarget:
    """The VLA as ``bac.protocol.CacheTarget``: the engine attaches to the action expert; a schedule is made for
    the sampler, K and the weights of the whole policy (the prefix feeds every expert block). Calibration runs
    sample over ``obs`` (key -> (N, ...) arrays, the instruction (N,) text) or the checkpoint's
    ``calibration/calib_obs.npz``."""

    def __init__(self, policy: VLAPolicy, checkpoint=None, obs: dict | None = None):
        self.policy, self.checkpoint, self.obs = policy, checkpoint, obs

    def cache_model(self) -> nn.Module:
        return self.policy.expert

    def cache_signature(self) -> Signature:
        p = self.policy
        return Signature(type(p.noise_scheduler).__name__, p.config.num_inference_steps, fingerprint(p))

    def cache_call(self):
        """One expert call as sampling makes it: the prefix keys/values precomputed, batch 1, zeros."""
        c, p = self.policy.config, self.policy
        x = torch.zeros(1, c.horizon, c.action_dim, device=p.device)
        with torch.no_grad():
            kv = p.expert.prefix_kv(torch.zeros(1, c.n_prefix_tokens, c.n_emb, device=p.device))
        return lambda: p.expert(x, 0.0, kv, None)

    def calibration_obs(self, n: int) -> dict:
        if self.obs is not None:
            return {k: v[:n] for k, v in self.obs.items()}
        if self.checkpoint is None:
            raise ValueError("VLACacheTarget needs calibration observations (obs=...) or a checkpoint folder")
        path = calib_obs_path(self.checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the calibrated cache methods sample over it (train_vla.py "
                                    "writes it beside the weights)")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in self.policy.config.obs_keys if k not in z.files]
            if missing:
                raise ValueError(f"{path} lacks observation keys {missing}")
            keys = self.policy.config.obs_keys + [k for k in [*self.policy.config.object_keys, "object_present"]
                                                  if k in z.files]
            return {k: z[k][:n] for k in keys}

    def cache_calibration(self):
        """The calibration eval/calibrate.py saved for this sampler and K (``calibration/<Scheduler>_K<K>.npz``), or
        None when there is none: bac then calibrates in memory over the same 8 observations with the same seed, so
        a saved and an unsaved calibration give the same schedules. One saved for other weights is refused."""
        if self.checkpoint is None:
            return None
        K = self.policy.config.num_inference_steps
        return saved_calibration(self.checkpoint, self.cache_signature(), f"python eval/calibrate.py policy=vla "
                                 f"policy.checkpoint={self.checkpoint} policy.num_inference_steps={K}")

    def cache_sample(self, cursor, n: int, seed: int) -> torch.Tensor:
        p = self.policy
        p.step_cursor = cursor
        try:
            out = p.predict_action(self.calibration_obs(n), generator=torch.Generator(device=p.device).manual_seed(seed))
        finally:
            p.step_cursor = None
        return out["action_pred"]
