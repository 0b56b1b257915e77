# SPDX-License-Identifier: MIT
"""The pre-norm Transformer block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .attention import Attention, FeatureAttention, KVCache
from .mla import MultiLatentAttention
from .mlp import SwiGLU
from .norm import RMSNorm


def build_attention(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    kind = cfg.attention.attention_type
    if kind in ("standard", "gqa"):
        return Attention(cfg, layer_idx)
    if kind == "mla":
        return MultiLatentAttention(cfg, layer_idx)
    if kind == "kernel":
        return FeatureAttention(cfg, layer_idx)
    raise ValueError(f"model.attention.attention_type must be standard, gqa, mla or kernel, got {kind!r}")


class TransformerBlock(nn.Module):
    """Block ``layer_idx``: x [B, T, C] -> [B, T, C]."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg, layer_idx)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, rope=None, *, causal: bool, cache: KVCache | None = None, start_pos=0, key_mask=None):
        """start_pos: int, or per-row positions [B, T] (int64); key_mask: None or [B, S] bool (False = padding)."""
        kw = {} if key_mask is None else {"key_mask": key_mask}
        h = x + self.drop(self.attn(self.attn_norm(x), rope, causal=causal, cache=cache, start_pos=start_pos, **kw))
        return h + self.drop(self.mlp(self.mlp_norm(h)))
