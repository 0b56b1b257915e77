# SPDX-License-Identifier: MIT
"""Standard / grouped-query attention and random-feature (kernel) attention blocks.

``Attention`` follows Llama's parameterisation (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, no biases,
RoPE on q and k in the rotate-half layout), so Llama attention weights load by name. With
``attention_type="standard"`` it is multi-head attention (K/V heads = n_heads); with ``"gqa"`` it keeps
``n_kv_heads`` K/V heads (Ainslie et al. 2023), which the kernels share across query-head groups without
repeating them.

``FeatureAttention`` has the same projections but replaces softmax by random features
(``stackwise.kernels.feature_attention``); its projection W is regenerated from ``kernel_seed``.

Every block calls the public ops of ``stackwise.kernels``; the backend comes from ``attention.backend``.
Batched generation with prompts of different lengths passes ``key_mask`` [B, S] (False = a padding key) and
per-row RoPE positions (``start_pos`` as a [B, T] tensor); with a key mask the block runs torch SDPA with a
boolean mask (``masked_attention``), and without one nothing changes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..kernels import attention as attention_op
from ..kernels import draw_features, feature_attention
from ._init import seeded_normal_


class KVCache:
    """Keys and values of one layer for incremental decoding: k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv]."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes held (all rows and positions)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def rotate(rope: nn.Module, x: torch.Tensor, pos) -> torch.Tensor:
    """RoPE on x [B, H, T, d] at positions start_pos .. start_pos + T - 1 (``pos`` an int), or at per-row
    positions ``pos`` [B, T] (int64; left-padded batches, where each row counts from its first real token)."""
    if not isinstance(pos, torch.Tensor):
        return rope(x, pos)
    if rope.cos.is_meta:
        return x
    if pos.numel() and int(pos.max()) >= rope.max_seq_len:
        raise ValueError(f"sequence positions up to {int(pos.max()) + 1} exceed model.max_seq_len "
                         f"({rope.max_seq_len}); raise model.max_seq_len")
    cos = rope.cos.to(x.device)[pos].unsqueeze(1)  # [B, 1, T, d/2], same math as RotaryEmbedding.forward
    sin = rope.sin.to(x.device)[pos].unsqueeze(1)
    xf = x.float()
    x1, x2 = xf[..., : rope.dim // 2], xf[..., rope.dim // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def allowed_keys(key_mask: torch.Tensor, T: int, *, causal: bool) -> torch.Tensor:
    """Boolean attention mask [B, 1, T, S] for T queries that are the last T of S positions.

    key_mask [B, S] is True for real keys. Each query also sees its own position, so a padding query (every
    key before it masked) stays finite; a real query's own key is real, so this changes nothing for it.
    """
    S = key_mask.shape[1]
    q_pos = torch.arange(S - T, S, device=key_mask.device)[:, None]  # [T, 1]
    k_pos = torch.arange(S, device=key_mask.device)[None, :]  # [1, S]
    allowed = key_mask[:, None, None, :]
    if causal:
        allowed = allowed & (k_pos <= q_pos)
    return allowed | (k_pos == q_pos)


def masked_attention(q, k, v, *, causal: bool, key_mask: torch.Tensor, scale=None) -> torch.Tensor:
    """Softmax attention with a key mask (torch SDPA): q [B, H, T, Dqk], k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv],
    key_mask [B, S] bool (True = attend) -> [B, H, T, Dv]. The T queries are the last T of the S positions."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    mask = allowed_keys(key_mask.to(q.device), q.shape[2], causal=causal)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def cached_attention(q, k, v, *, causal: bool, cache: KVCache | None, scale=None, backend="auto", key_mask=None):
    """Attention that optionally appends to a KV cache.

    Prefill (empty cache) runs the normal op; a decoding step (one query token) attends to every cached
    key. Chunked prefill on top of a cache (T > 1 with keys already cached) is not supported. ``key_mask``
    [B, S] (S = cached + new keys; False = padding) switches to :func:`masked_attention`.
    """
    if key_mask is not None:
        if cache is not None:
            k, v = cache.append(k, v)
        return masked_attention(q, k, v, causal=causal, key_mask=key_mask, scale=scale)
    if cache is None:
        return attention_op(q, k, v, causal=causal, scale=scale, backend=backend)
    had = cache.length
    k, v = cache.append(k, v)
    if had == 0:
        return attention_op(q, k, v, causal=causal, scale=scale, backend=backend)
    if q.shape[2] != 1:
        raise NotImplementedError("KV-cache decoding takes one new token per step after the prefill")
    return attention_op(q, k, v, causal=False, scale=scale, backend="torch")


def _init_linear(lin: nn.Linear, std: float, *parts: object) -> None:
    seeded_normal_(lin.weight, std, *parts)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention: x [B, T, C] -> [B, T, C]."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.init_seed, self.init_std = layer_idx, cfg.init_seed, cfg.init_std
        self.n_layers = cfg.init_depth  # the depth its o_proj is initialised for
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.backend = cfg.attention.backend
        C = cfg.d_model
        self.q_proj = nn.Linear(C, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(C, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, C, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in ("q_proj", "k_proj", "v_proj"):
            _init_linear(getattr(self, name), self.init_std, self.init_seed, self.layer_idx, f"attn.{name}")
        out_std = self.init_std / (2 * self.n_layers) ** 0.5
        _init_linear(self.o_proj, out_std, self.init_seed, self.layer_idx, "attn.o_proj")

    def _qkv(self, x: torch.Tensor, rope: nn.Module | None, start_pos):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rotate(rope, q, start_pos), rotate(rope, k, start_pos)
        return q, k, v

    def forward(self, x, rope=None, *, causal: bool, cache: KVCache | None = None, start_pos=0, key_mask=None):
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope, start_pos)
        o = cached_attention(q, k, v, causal=causal, cache=cache, backend=self.backend, key_mask=key_mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))


class FeatureAttention(Attention):
    """Random-feature (kernel) attention, linear in T, with Attention's projections: x [B, T, C] -> [B, T, C].

    The random projection W [head_dim, n_features] is a non-persistent buffer drawn from
    ``attention.kernel_seed`` (shared by all layers and heads); checkpoints never store it. With the "trig" map
    the block learns a temperature per kv head, stored as ``log_temperature`` [n_kv_heads] and initialised
    to log(``attention.kernel_trig_temperature``).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        a = cfg.attention
        self.feature_map = a.kernel_feature_map
        W = draw_features(self.head_dim, a.kernel_n_features, family=a.kernel_family, seed=a.kernel_seed)
        self.register_buffer("W", W, persistent=False)
        self.trig_temperature = a.kernel_trig_temperature
        if self.feature_map == "trig":
            self.log_temperature = nn.Parameter(torch.full((self.n_kv_heads,), math.log(self.trig_temperature)))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if hasattr(self, "log_temperature"):
            with torch.no_grad():
                self.log_temperature.fill_(math.log(self.trig_temperature))

    def forward(self, x, rope=None, *, causal: bool, cache: KVCache | None = None, start_pos=0, key_mask=None):
        if cache is not None:
            raise NotImplementedError("feature attention has no KV cache; decode by recomputing the prefix")
        if key_mask is not None:
            raise NotImplementedError("feature attention takes no key mask (padding keys would enter its sums); "
                                      "run prompts of different lengths one at a time")
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope, start_pos)
        tau = self.log_temperature.exp() if self.feature_map == "trig" else None
        o = feature_attention(q, k, v, self.W, causal=causal, feature_map=self.feature_map, backend=self.backend,
                              temperature=tau)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
