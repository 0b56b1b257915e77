# SPDX-License-Identifier: MIT
"""StackWise attention ops: softmax attention (MHA / GQA / MLA head dims) and random-feature attention.

Public, autograd-aware ops (layout [B, H, T, D], the layout of ``scaled_dot_product_attention``):

- :func:`attention` — exact softmax attention, bidirectional or causal.
- :func:`feature_attention` — random-feature (kernel) attention, linear in T.
- :func:`draw_features` — the seeded random projection that ``feature_attention`` uses.

Backend: "auto" runs the Triton kernels on CUDA (or on CPU under ``TRITON_INTERPRET=1``) and the torch
path otherwise (SDPA for softmax attention, the chunked linear-time path for features).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._utils import check_attention_inputs, choose_backend
from .features.reference import FEATURE_MAPS, draw_features, feature_attention_chunked
from .flash.reference import attention_ref

__all__ = ["attention", "feature_attention", "draw_features"]


def _sdpa(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    if group > 1:
        # repeat_interleave keeps the mapping q head h -> kv head h // group; works on every torch >= 2.1
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Softmax attention with grouped K/V heads and independent value head dim.

    Args:
        q (torch.Tensor): [B, H, T, Dqk].
        k (torch.Tensor): [B, Hkv, T, Dqk]; H % Hkv == 0 (MHA when equal, MQA when Hkv == 1).
        v (torch.Tensor): [B, Hkv, T, Dv]; Dv may differ from Dqk (MLA uses 192 / 128).
        causal: mask future keys.
        scale: defaults to Dqk ** -0.5.
        backend: "auto" | "triton" | "torch".

    Returns:
        torch.Tensor: [B, H, T, Dv], dtype of q.

    Raises:
        ValueError: bad shapes, dtypes or devices, naming the argument.

    Examples::

        >>> q = torch.randn(2, 8, 17, 64); k = v = torch.randn(2, 2, 17, 64)
        >>> attention(q, k, v, causal=True).shape
        torch.Size([2, 8, 17, 64])
    """
    check_attention_inputs(q, k, v)
    which = choose_backend(backend, q.device)
    if k.shape[2] != q.shape[2]:
        # decoding against a KV cache: a few new queries attend to every cached key
        if causal:
            raise NotImplementedError(
                f"causal attention needs T == S, got q length {q.shape[2]}, k length {k.shape[2]}; for KV-cache "
                "decoding pass causal=False with the new tokens' queries"
            )
        return _sdpa(q, k, v, False, scale)
    if which == "triton":
        from .flash.triton import flash_attention

        return flash_attention(q, k, v, causal=causal, scale=scale)
    return _sdpa(q, k, v, causal, scale)


def feature_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    *,
    causal: bool,
    feature_map: str = "softmax",
    scale: float | None = None,
    backend: str = "auto",
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Random-feature (kernel) attention, O(T) in time and memory.

    Args:
        q (torch.Tensor): [B, H, T, D].
        k (torch.Tensor): [B, Hkv, T, D]; H % Hkv == 0.
        v (torch.Tensor): [B, Hkv, T, Dv].
        W (torch.Tensor): [D, M] from :func:`draw_features`, shared by all heads.
        causal: query i attends to keys j <= i.
        feature_map: "softmax" (positive features estimating exp(q.k * scale)) or "trig" (random Fourier).
        scale: defaults to D ** -0.5.
        backend: "auto" | "triton" | "torch". "auto" runs the Triton kernels on CUDA for head dims <= 256 and
            M <= 1024 (the feature axis is split into chunks, ``features.triton.fits``) and the torch path
            beyond; "triton" raises there.
        temperature: "trig" only: tau > 0, a float or a tensor [] / [Hkv] (one per kv head, differentiable);
            the estimated weight is exp(tau^2 s^2 (cos(q, k) - 1)). None means 1.

    Returns:
        torch.Tensor: [B, H, T, Dv], dtype of q.

    Raises:
        ValueError: bad shapes or arguments, naming them; a temperature with feature_map="softmax".

    Examples::

        >>> W = draw_features(64, 128, family="orthogonal", seed=0)
        >>> q = k = v = torch.randn(1, 4, 33, 64)
        >>> feature_attention(q, k, v, W, causal=True).shape
        torch.Size([1, 4, 33, 64])
    """
    check_attention_inputs(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"feature_attention needs T == S, got q length {q.shape[2]}, k length {k.shape[2]}")
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.shape[0] != q.shape[-1]:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be [head_dim={q.shape[-1]}, n_features], got {got}; use draw_features()")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")
    if temperature is not None:
        if feature_map != "trig":
            raise ValueError(f"temperature applies to feature_map='trig' only, got feature_map={feature_map!r}")
        t = torch.as_tensor(temperature)
        if t.dim() > 1 or (t.dim() == 1 and t.numel() != k.shape[1]):
            raise ValueError(f"temperature must be a scalar or [n_kv_heads={k.shape[1]}], got shape {tuple(t.shape)}")
        if isinstance(temperature, (int, float)) and not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
    which = choose_backend(backend, q.device)
    if which == "triton":
        from .features.triton import fits, triton_feature_attention

        if backend == "triton" or fits(q.shape[-1], v.shape[-1], W.shape[1], feature_map == "trig", q.device):
            return triton_feature_attention(q, k, v, W, causal=causal, feature_map=feature_map, scale=scale,
                                            temperature=temperature)
    return feature_attention_chunked(q, k, v, W.to(q.device), causal=causal, feature_map=feature_map, scale=scale,
                                     temperature=temperature)
