# SPDX-License-Identifier: MIT
"""The StackWise block library: norms, RoPE, SwiGLU with frozen seeded projections, attention kinds, the block."""

from .attention import Attention, FeatureAttention, KVCache
from .block import TransformerBlock, build_attention
from .mla import LatentKVCache, MultiLatentAttention
from .mlp import SwiGLU
from .norm import RMSNorm, RotaryEmbedding

__all__ = [
    "Attention",
    "FeatureAttention",
    "KVCache",
    "LatentKVCache",
    "MultiLatentAttention",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "TransformerBlock",
    "build_attention",
]
