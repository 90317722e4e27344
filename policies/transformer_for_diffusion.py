"""The denoiser of transformer Diffusion Policy (DP-T), Chi et al. 2023, "TransformerForDiffusion".

Same math and the same state-dict keys as the upstream module built on ``nn.TransformerDecoder`` (obs as
condition, time as condition, no condition transformer layers), so upstream DP-T weights load here. The
difference is structural: every decoder layer exposes its three residual branches as methods,
``sa_block``, ``ca_block`` and ``ff_block``, each returning the delta it adds to the residual stream.
A cache engine can wrap those from outside; the model itself knows nothing about caching.

Shapes: B batch, T horizon, To observation steps, Da action dim, Do observation feature dim.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bac.modcall import bind, needs_module_call


def _dropout(drop: nn.Dropout, x: torch.Tensor) -> torch.Tensor:
    """``drop(x)``, without the module call in eval mode, where dropout is the identity."""
    return drop(x) if drop.training else x


class SinusoidalPosEmb(nn.Module):
    """Timestep embedding: ``[sin(t * w_i), cos(t * w_i)]`` with log-spaced frequencies (no weights)."""

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        angles = t.float()[:, None] * freqs[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter layout (packed in_proj, out_proj)."""

    def __init__(self, n_emb: int, n_head: int, p_drop: float):
        super().__init__()
        if n_emb % n_head:
            raise ValueError(f"n_emb ({n_emb}) must be divisible by n_head ({n_head})")
        self.n_head = n_head
        self.p_drop = p_drop
        self.in_proj_weight = nn.Parameter(torch.empty(3 * n_emb, n_emb))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * n_emb))
        self.out_proj = nn.Linear(n_emb, n_emb)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, n_emb) attends to context (B, S, n_emb); mask (T, S) is additive (0 or -inf)."""
        B, T, C = x.shape
        w_q, w_kv = self.in_proj_weight.split([C, 2 * C])
        b_q, b_kv = self.in_proj_bias.split([C, 2 * C])
        q = F.linear(x, w_q, b_q)
        k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        h = self.n_head
        q = q.view(B, T, h, C // h).transpose(1, 2)  # (B, h, T, C/h)
        k = k.view(B, -1, h, C // h).transpose(1, 2)
        v = v.view(B, -1, h, C // h).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p_drop if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer; keys match ``nn.TransformerDecoderLayer(norm_first=True, activation="gelu")``."""

    def __init__(self, n_emb: int, n_head: int, p_drop: float):
        super().__init__()
        self.self_attn = Attention(n_emb, n_head, p_drop)
        self.multihead_attn = Attention(n_emb, n_head, p_drop)
        self.linear1 = nn.Linear(n_emb, 4 * n_emb)
        self.linear2 = nn.Linear(4 * n_emb, n_emb)
        self.norm1 = nn.LayerNorm(n_emb)
        self.norm2 = nn.LayerNorm(n_emb)
        self.norm3 = nn.LayerNorm(n_emb)
        self.dropout = nn.Dropout(p_drop)
        self.dropout1 = nn.Dropout(p_drop)
        self.dropout2 = nn.Dropout(p_drop)
        self.dropout3 = nn.Dropout(p_drop)

    # The three residual branches. Each returns the delta it adds to x.
    def sa_block(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        return _dropout(self.dropout1, self.self_attn(h, h, mask))

    def ca_block(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor) -> torch.Tensor:
        return _dropout(self.dropout2, self.multihead_attn(self.norm2(x), memory, memory_mask))

    def ff_block(self, x: torch.Tensor) -> torch.Tensor:
        return _dropout(self.dropout3, self.linear2(_dropout(self.dropout, F.gelu(self.linear1(self.norm3(x))))))

    def forward(self, x, memory, mask, memory_mask):  # (B, T, n_emb) -> (B, T, n_emb)
        x = x + self.sa_block(x, mask)
        x = x + self.ca_block(x, memory, memory_mask)
        return x + self.ff_block(x)


class Decoder(nn.Module):
    def __init__(self, n_layer: int, n_emb: int, n_head: int, p_drop: float):
        super().__init__()
        self.layers = nn.ModuleList([DecoderLayer(n_emb, n_head, p_drop) for _ in range(n_layer)])

    def forward(self, x, memory, mask, memory_mask):
        for layer in self.layers:
            x = layer(x, memory, mask, memory_mask)
        return x


class TransformerForDiffusion(nn.Module):
    """Predicts the noise of an action trajectory given the diffusion timestep and observation features.

    Condition tokens ("memory"): ``[time, obs_1 .. obs_To]`` + learned positions, through a token-wise MLP
    (``encoder``). Action tokens: ``input_emb`` of the noisy trajectory + ``pos_emb``, through ``n_layer``
    pre-norm decoder layers with causal self-attention and cross-attention to the memory.
    """

    # The residual branches a cache engine may wrap (see bac.engine.find_blocks), and the layers whose
    # forward is exactly "input + sum of those branches' outputs" (so fully reused layers can be fused).
    cache_blocks = "decoder.layers.*.{sa_block,ca_block,ff_block}"
    cache_layers = "decoder.layers.*"
    cache_stack = "decoder"  # Decoder.forward applies the layers in order with the same arguments

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        horizon: int,
        n_obs_steps: int,
        cond_dim: int,
        n_layer: int = 8,
        n_head: int = 4,
        n_emb: int = 256,
        p_drop_emb: float = 0.0,
        p_drop_attn: float = 0.1,
        causal_attn: bool = True,
    ):
        super().__init__()
        T, T_cond = horizon, 1 + n_obs_steps
        self.horizon, self.n_obs_steps = horizon, n_obs_steps
        self.input_emb = nn.Linear(input_dim, n_emb)
        self.pos_emb = nn.Parameter(torch.zeros(1, T, n_emb))
        self.drop = nn.Dropout(p_drop_emb)
        self.time_emb = SinusoidalPosEmb(n_emb)
        self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
        self.cond_pos_emb = nn.Parameter(torch.zeros(1, T_cond, n_emb))
        self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(), nn.Linear(4 * n_emb, n_emb))
        self.decoder = Decoder(n_layer, n_emb, n_head, p_drop_attn)
        # Additive masks, stored like upstream (persistent buffers `mask` and `memory_mask`).
        if causal_attn:
            allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))
            t, s = torch.meshgrid(torch.arange(T), torch.arange(T_cond), indexing="ij")
            allowed_mem = t >= (s - 1)  # action token t sees the time token and obs tokens up to t + 1
        else:
            allowed = torch.ones(T, T, dtype=torch.bool)
            allowed_mem = torch.ones(T, T_cond, dtype=torch.bool)
        self.register_buffer("mask", torch.zeros(T, T).masked_fill(~allowed, float("-inf")))
        self.register_buffer("memory_mask", torch.zeros(T, T_cond).masked_fill(~allowed_mem, float("-inf")))
        self.ln_f = nn.LayerNorm(n_emb)
        self.head = nn.Linear(n_emb, output_dim)
        self.apply(self._init_weights)
        nn.init.normal_(self.pos_emb, std=0.02)
        nn.init.normal_(self.cond_pos_emb, std=0.02)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Attention):
            nn.init.normal_(module.in_proj_weight, std=0.02)
            nn.init.zeros_(module.in_proj_bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def encode_obs(self, cond: torch.Tensor) -> torch.Tensor:
        """Observation tokens of the memory, (B, To, Do) -> (B, To, n_emb). Constant across denoising steps."""
        x = self.drop(self.cond_obs_emb(cond) + self.cond_pos_emb[:, 1 : 1 + cond.shape[1]])
        return self.encoder(x)

    def encode_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """Time token of the memory, (B,) -> (B, 1, n_emb)."""
        x = self.drop(self.time_emb(timestep)[:, None] + self.cond_pos_emb[:, :1])
        return self.encoder(x)

    def memory(self, obs_tokens: torch.Tensor, time_tokens: torch.Tensor) -> torch.Tensor:
        """Memories of K denoising steps at once: obs_tokens (B, To, n_emb), time_tokens (K, 1, n_emb)
        -> (K, B, 1 + To, n_emb)."""
        K, B = time_tokens.shape[0], obs_tokens.shape[0]
        return torch.cat([time_tokens[:, None].expand(K, B, 1, -1), obs_tokens[None].expand(K, -1, -1, -1)], dim=2)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        cond: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sample (B, T, Da), timestep (B,) or scalar, cond (B, To, Do) -> predicted noise (B, T, Da).

        ``memory`` (B, 1 + To, n_emb) may replace ``cond``: a sampler computes the observation and time
        tokens of all K steps once per action chunk (:meth:`memory`) instead of once per denoising step.
        The result is the same because the condition MLP acts token by token.
        """
        if memory is None:
            if cond is None:
                raise ValueError("TransformerForDiffusion needs `cond` (B, To, Do) or a precomputed `memory`")
            B = sample.shape[0]
            timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(B)
            memory = torch.cat([self.encode_time(timestep), self.encode_obs(cond)], dim=1)  # (B, 1 + To, n_emb)
        T = sample.shape[1]
        x = self.input_emb(sample) + (self.pos_emb if T == self.horizon else self.pos_emb[:, :T])
        x = self.decoder(_dropout(self.drop, x), memory, self.mask, self.memory_mask)
        return self.head(self.ln_f(x))

    def denoiser(self, memories: Sequence[torch.Tensor]) -> Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]:
        """``f(x, t, k)``: the predicted noise for the noisy trajectory ``x`` at step ``k`` of one sampling run,
        given the run's per-step memories (``memory(...).unbind(0)``, which hold ``t``). The same ops as
        ``self(x, t, memory=memories[k])``, so the same bits, with the modules and tensors used at every step
        looked up once per run (``bac.modcall.bind``): with the decoder's layers reused by a cache, module
        calls and attribute lookups would otherwise be a sizeable share of a step on a CPU."""
        if self.training or self.drop.training or needs_module_call(self):
            return lambda x, t, k: self(x, t, memory=memories[k])
        input_emb, decoder, ln_f, head = (bind(m) for m in (self.input_emb, self.decoder, self.ln_f, self.head))
        pos, mask, memory_mask, horizon = self.pos_emb, self.mask, self.memory_mask, self.horizon

        def step(x: torch.Tensor, t: torch.Tensor, k: int) -> torch.Tensor:  # forward's body, in eval mode
            h = input_emb(x) + (pos if x.shape[1] == horizon else pos[:, : x.shape[1]])
            return head(ln_f(decoder(h, memories[k], mask, memory_mask)))

        return step
