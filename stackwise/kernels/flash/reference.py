# SPDX-License-Identifier: MIT
"""Pure-PyTorch softmax attention: the specification every attention kernel is tested against.

Straight-line math, no speed tricks: scores are materialised, GQA repeats K/V explicitly.
"""

from __future__ import annotations

import torch


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Softmax attention ``softmax(q k^T * scale [+ causal mask]) v`` with GQA head sharing.

    Args:
        q (torch.Tensor): [B, H, T, Dqk] queries.
        k (torch.Tensor): [B, Hkv, S, Dqk] keys; H % Hkv == 0, query head h uses kv head h // (H // Hkv).
        v (torch.Tensor): [B, Hkv, S, Dv] values; Dv may differ from Dqk (MLA).
        causal: mask key j > query i (aligned at the start; T == S for training).
        scale: score scale; defaults to Dqk ** -0.5.
        upcast: compute in float32 (float64 stays float64); False computes in the input dtype (the
            low-precision noise yardstick of the tests).

    Returns:
        torch.Tensor: [B, H, T, Dv] in the input dtype.
    """
    dtype = q.dtype
    if upcast and dtype != torch.float64:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, H, T, S]
    if causal:
        T, S = s.shape[-2:]
        keep = torch.ones(T, S, dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v).to(dtype)


def attention_lse_ref(q: torch.Tensor, k: torch.Tensor, *, causal: bool, scale: float | None = None) -> torch.Tensor:
    """Log-sum-exp of the scaled scores per query, [B, H, T], float32: what the flash kernels save for backward."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    s = torch.matmul(q.float(), k.transpose(-1, -2)) * scale
    if causal:
        T, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(T, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return torch.logsumexp(s, dim=-1)
