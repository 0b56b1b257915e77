# SPDX-License-Identifier: MIT
"""The references (the spec) against independent float64 computations.

``attention_ref`` vs a per-head loop with explicit kv-head indexing and vs PyTorch SDPA; ``attention_lse_ref``
vs a naive log-sum-exp; ``feature_attention_ref`` vs unstabilised feature maps written out from the formulas
(the stabilisers must cancel); ``feature_attention_chunked`` (the torch path) vs the quadratic spec;
``draw_features`` determinism and structure; FAVOR+ features estimate exp(q.k * scale) without bias.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stackwise.kernels import draw_features
from stackwise.kernels.features.reference import feature_attention_chunked, feature_attention_ref
from stackwise.kernels.flash.reference import attention_lse_ref, attention_ref
from tests.utils import assert_close

SHAPES = [
    pytest.param(2, 17, 4, 4, 64, 64, id="B2-T17-H4-Hkv4-D64"),
    pytest.param(1, 33, 4, 2, 192, 128, id="B1-T33-H4-Hkv2-D192x128"),
    pytest.param(2, 1, 4, 1, 40, 40, id="B2-T1-H4-Hkv1-D40"),
    pytest.param(1, 113, 2, 1, 96, 64, id="B1-T113-H2-Hkv1-D96x64"),
]


def _naive_attention(q, k, v, causal, scale):
    """Per (batch, head) loop in float64: query head h reads kv head h // (H // Hkv)."""
    B, H, T, _ = q.shape
    group = H // k.shape[1]
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = q[b, h].double() @ k[b, h // group].double().T * scale
            if causal:
                s = s + torch.full((T, T), -math.inf, dtype=torch.float64).triu(1)
            w = torch.exp(s - s.max(-1, keepdim=True).values)
            out[b, h] = (w / w.sum(-1, keepdim=True)) @ v[b, h // group].double()
    return out


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("B, T, H, Hkv, D, Dv", SHAPES)
def test_attention_ref_matches_naive_and_sdpa(B, T, H, Hkv, D, Dv, causal):
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, Dv)
    naive = _naive_attention(q, k, v, causal, D**-0.5)
    assert_close("ref64", naive, attention_ref(q.double(), k.double(), v.double(), causal=causal), 1e-12)
    ref32 = attention_ref(q, k, v, causal=causal)
    assert ref32.dtype == torch.float32
    assert_close("ref32", naive, ref32, 1e-6)
    group = H // Hkv
    sdpa = F.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1), is_causal=causal
    )
    assert_close("sdpa", sdpa, naive, 1e-12)


def test_attention_ref_scale_and_dtype():
    q, k, v = torch.randn(1, 2, 9, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 8)
    naive = _naive_attention(q, k, v, True, 0.3)
    assert_close("scale", naive, attention_ref(q, k, v, causal=True, scale=0.3), 1e-6)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    lowp = attention_ref(qb, kb, vb, causal=True, scale=0.3, upcast=False)
    assert lowp.dtype == torch.bfloat16
    assert_close("bf16 no upcast", _naive_attention(qb, kb, vb, True, 0.3), lowp, 2e-2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_attention_lse_ref(causal):
    q, k = torch.randn(2, 4, 21, 32), torch.randn(2, 2, 21, 32)
    s = q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2) * 32**-0.5
    if causal:
        s = s.masked_fill(torch.ones(21, 21, dtype=torch.bool).triu(1), -math.inf)
    naive = torch.log(torch.exp(s).sum(-1))
    assert_close("lse", naive, attention_lse_ref(q, k, causal=causal), 1e-6)


def _naive_features(x, W, fmap, scale):
    """phi(x) in float64 straight from the formulas, without stabilisers."""
    x, W = x.double(), W.double()
    M, D = W.shape[1], W.shape[0]
    if fmap == "softmax":
        xs = x * math.sqrt(scale)
        return torch.exp(xs @ W - 0.5 * (xs * xs).sum(-1, keepdim=True)) / math.sqrt(M)
    xs = x / x.norm(dim=-1, keepdim=True) * math.sqrt(scale) * D**0.25
    return torch.cat([torch.cos(xs @ W), torch.sin(xs @ W)], -1) / math.sqrt(M)


def _naive_feature_attention(q, k, v, W, causal, fmap):
    D = q.shape[-1]
    group = q.shape[1] // k.shape[1]
    pq = _naive_features(q, W, fmap, D**-0.5)
    pk = _naive_features(k.repeat_interleave(group, 1), W, fmap, D**-0.5)
    a = pq @ pk.transpose(-1, -2)
    if causal:
        a = a.tril()
    return (a @ v.double().repeat_interleave(group, 1)) / a.sum(-1, keepdim=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("fmap, family", [("softmax", "gaussian"), ("softmax", "orthogonal"), ("trig", "laplacian")])
def test_feature_attention_ref_matches_naive(fmap, family, causal):
    """The stabilised spec equals the plain formulas, and the chunked torch path equals the spec."""
    q, k, v = torch.randn(2, 4, 45, 32) * 0.5, torch.randn(2, 2, 45, 32) * 0.5, torch.randn(2, 2, 45, 24)
    W = draw_features(32, 64, family=family, seed=2)
    naive = _naive_feature_attention(q, k, v, W, causal, fmap)
    ref = feature_attention_ref(q.double(), k.double(), v.double(), W.double(), causal=causal, feature_map=fmap)
    assert_close("ref64", naive, ref, 1e-10)
    chunked = feature_attention_chunked(q, k, v, W, causal=causal, feature_map=fmap, chunk=16)
    assert_close("chunked", naive, chunked, 1e-5)


def test_draw_features_deterministic_and_structured():
    a = draw_features(16, 40, family="orthogonal", seed=5)
    assert torch.equal(a, draw_features(16, 40, family="orthogonal", seed=5))
    assert not torch.equal(a, draw_features(16, 40, family="orthogonal", seed=6))
    assert a.shape == (16, 40) and a.dtype == torch.float32
    # within a block of D columns the directions are orthogonal
    block = a[:, :16].double()
    gram = block.T @ block
    off_diag = gram - torch.diag(torch.diagonal(gram))
    assert off_diag.abs().max().item() < 1e-4 * gram.diagonal().max().item()
    for family in ("gaussian", "laplacian"):
        assert draw_features(8, 4, family=family, seed=0).shape == (8, 4)
    with pytest.raises(ValueError, match="family"):
        draw_features(8, 4, family="uniform")


def test_favor_features_unbiased():
    """E[phi(q) . phi(k)] = exp(q'.k') for Gaussian W (the FAVOR+ identity), checked with many features."""
    D = 8
    q, k = torch.randn(5, D) * 0.5, torch.randn(5, D) * 0.5
    W = draw_features(D, 200_000, family="gaussian", seed=0).double()
    est = (_naive_features(q, W, "softmax", D**-0.5) * _naive_features(k, W, "softmax", D**-0.5)).sum(-1)
    exact = torch.exp((q.double() * k.double()).sum(-1) * D**-0.5)
    assert_close("kernel estimate", exact, est, 1e-2)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_grouped_long_sequence_path_matches_reference(causal):
    """T >= GROUP_MIN_T runs the torch path per (batch, kv head) group: same values and gradients as the spec."""
    from stackwise.kernels.features.reference import GROUP_MIN_T, draw_features, feature_attention_chunked
    from stackwise.kernels.features.reference import feature_attention_ref as spec

    torch.manual_seed(0)
    T = GROUP_MIN_T + 37
    q = torch.randn(2, 4, T, 16, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, T, 16, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, T, 8, dtype=torch.float64, requires_grad=True)
    W = draw_features(16, 16, family="orthogonal", seed=3, dtype=torch.float64)
    do = torch.randn(2, 4, T, 8, dtype=torch.float64)
    out = feature_attention_chunked(q, k, v, W, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), do)
    ref = spec(q, k, v, W, causal=causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    for name, g, r in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-7, atol=1e-9, msg=lambda m, n=name: f"d{n}: {m}")
