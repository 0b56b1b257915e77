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
"""

from __future__ import annotations

import math

import torch
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

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def cached_attention(q, k, v, *, causal: bool, cache: KVCache | None, scale=None, backend="auto"):
    """Attention that optionally appends to a KV cache.

    Prefill (empty cache) runs the normal op; a decoding step (one query token) attends to every cached
    key. Chunked prefill on top of a cache (T > 1 with keys already cached) is not supported.
    """
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
        self.layer_idx, self.init_seed, self.init_std, self.n_layers = layer_idx, cfg.init_seed, cfg.init_std, cfg.n_layers
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

    def _qkv(self, x: torch.Tensor, rope: nn.Module | None, start_pos: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = rope(q, start_pos), rope(k, start_pos)
        return q, k, v

    def forward(self, x, rope=None, *, causal: bool, cache: KVCache | None = None, start_pos: int = 0):
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope, start_pos)
        o = cached_attention(q, k, v, causal=causal, cache=cache, backend=self.backend)  # [B, H, T, D]
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

    def forward(self, x, rope=None, *, causal: bool, cache: KVCache | None = None, start_pos: int = 0):
        if cache is not None:
            raise NotImplementedError("feature attention has no KV cache; decode by recomputing the prefix")
        B, T, _ = x.shape
        q, k, v = self._qkv(x, rope, start_pos)
        tau = self.log_temperature.exp() if self.feature_map == "trig" else None
        o = feature_attention(q, k, v, self.W, causal=causal, feature_map=self.feature_map, backend=self.backend,
                              temperature=tau)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, -1))
