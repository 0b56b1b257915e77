# SPDX-License-Identifier: MIT
"""Per-layer pieces of the planner (:mod:`stackwise.plan`): parameter counts of one layer built on the meta device,
the attention implementation a device runs, activation bytes per layer and attention FLOPs per token.

The formulas are the ones the planner's module docstring states and tests/test_plan.py checks against
``torch.autograd.graph.saved_tensors_hooks``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .config import StackWiseConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _meta_layer(cfg: StackWiseConfig, k: int) -> nn.Module:
    from .model import StackWiseLM

    m = cfg.model
    if m.attention.attention_type == "kernel":
        # draw_features cannot run on meta; FeatureAttention has exactly Attention's parameters (W is a buffer)
        attn = dataclasses.replace(m.attention, attention_type="standard")
        m = dataclasses.replace(m, attention=attn)
    with torch.device("meta"):
        model = StackWiseLM(m, layers=[k])
    if m is not cfg.model:
        a = cfg.model.attention
        model.register_buffer("feature_W", torch.zeros(cfg.model.head_dim, a.kernel_n_features), persistent=False)
    return model


def _count(params) -> tuple[int, int, int, int]:
    """(trainable, frozen, trainable matmul, frozen matmul) element counts, tied weights once."""
    seen, out = set(), [0, 0, 0, 0]
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = getattr(p, "ds_numel", p.numel())
        out[0 if p.requires_grad else 1] += n
        if p.dim() == 2:
            out[2 if p.requires_grad else 3] += n
    return tuple(out)


def _attn_impl(cfg: StackWiseConfig, device: str) -> str:
    a = cfg.model.attention
    if a.attention_type == "kernel":
        return "features"
    triton = device == "cuda" and a.backend in ("auto", "triton")
    if a.attention_type == "mla":
        return "flash" if device == "cuda" else "math"
    return "flash" if triton else "flash_repeated"


def layer_activation_bytes(cfg: StackWiseConfig, B: int, T: int, s: int, device: str, *, first: bool) -> int:
    """Bytes one block saves for backward on B x T tokens (formulas in the module docstring)."""
    m, a = cfg.model, cfg.model.attention
    f, C, F, H, D = 4, m.d_model, m.d_ff, m.n_heads, m.head_dim
    impl = _attn_impl(cfg, device)
    Dv = a.v_head_dim if a.attention_type == "mla" else D
    tok = f * 4 * C + s * C + s * H * Dv + s * 4 * F - (f * C if first else 0)
    if "gate" not in m.frozen_mlp or "up" not in m.frozen_mlp:
        tok += s * C
    if "down" in m.frozen_mlp:
        tok -= s * F
    seq = 0
    if a.attention_type in ("standard", "gqa"):
        tok += (s * (2 * C + 2 * m.kv_heads * D) if impl == "flash" else s * 4 * C) + f * H
    elif a.attention_type == "mla":
        dqk = a.qk_nope_head_dim + a.qk_rope_head_dim
        if impl == "math":
            tok += f * H * (2 * dqk + Dv + T)
        else:
            tok += s * H * (2 * dqk + 2 * Dv) + f * H
        if a.mla_rq:
            tok += f * 2 * a.mla_rq + s * a.mla_rq
        tok += f * 2 * a.mla_rkv + s * a.mla_rkv + (f * a.qk_rope_head_dim if s == 4 else 0)
    else:
        mp = a.kernel_n_features * (2 if a.kernel_feature_map == "trig" else 1)
        tok += f * (4 * H * D + 6 * H * mp + 3 * H)
        seq = f * H * (mp * D + mp + 1)
    return B * T * tok + B * seq


def _attn_flops(cfg: StackWiseConfig, T: int, causal: bool) -> tuple[float, float]:
    """(forward, forward+backward) attention FLOPs per token of one layer."""
    m, a = cfg.model, cfg.model.attention
    if a.attention_type == "mla":
        fwd = 2 * T * m.n_heads * (a.qk_nope_head_dim + a.qk_rope_head_dim + a.v_head_dim)
    elif a.attention_type == "kernel":
        mp = a.kernel_n_features * (2 if a.kernel_feature_map == "trig" else 1)
        return 4 * m.n_heads * mp * m.head_dim * 2.0, 12 * m.n_heads * mp * m.head_dim * 2.0
    else:
        fwd = 4 * T * m.d_model
    fwd = fwd / 2 if causal else fwd
    return float(fwd), 3.0 * fwd
