# SPDX-License-Identifier: MIT
"""Both attention kernels on CUDA against their references, in fp32 / bf16 / fp16, output and every gradient.

Tolerance (STYLE.md, flash-attn's rule): ``max|out - ref_hi| <= 2 * max|ref_lowp - ref_hi| + 1e-5`` for the
output, factor 3 for the gradients. For bf16/fp16, ``ref_hi`` is the reference upcast to fp32 and ``ref_lowp``
the reference run in the input dtype (``upcast=False``); for fp32, ``ref_hi`` is the float64 reference and
``ref_lowp`` the fp32 one, so every dtype is judged against PyTorch's own noise at that precision.
"""

from __future__ import annotations

import pytest
import torch

from stackwise.kernels import draw_features, feature_attention
from stackwise.kernels.features.reference import feature_attention_ref
from stackwise.kernels.flash.reference import attention_ref
from stackwise.kernels.flash.triton import flash_attention
from tests.utils import assert_within_noise

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (H, Hkv, Dqk, Dv): MHA d64, GQA d128, MLA 192/128, MQA d256
FLASH_SHAPES = {"mha-d64": (4, 4, 64, 64), "gqa-d128": (8, 2, 128, 128), "mla-192x128": (4, 4, 192, 128),
                "mqa-d256": (4, 1, 256, 256)}


def _inputs(B, H, Hkv, T, D, Dv, dtype):
    q = torch.randn(B, H, T, D, device="cuda").to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, T, D, device="cuda").to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, Dv, device="cuda").to(dtype).requires_grad_()
    do = torch.randn(B, H, T, Dv, device="cuda").to(dtype)
    return q, k, v, do


def _grads(fn, leaves, do):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    o = fn(*leaves)
    o.backward(do.to(o.dtype))
    return [o] + [x.grad for x in leaves]


def _check(name_prefix, got, hi, lowp):
    for i, (name, g, h, n) in enumerate(zip(("o", "dq", "dk", "dv", "dtau"), got, hi, lowp)):
        assert_within_noise(f"{name_prefix} {name}", h, g, n, 2 if i == 0 else 3)


def _refs(spec, leaves, do, dtype):
    """(ref_hi, ref_lowp) output + gradients, per the module docstring."""
    if dtype == torch.float32:
        hi = _grads(lambda *x: spec(*x, upcast=False), [x.double() for x in leaves], do.double())
        lowp = _grads(lambda *x: spec(*x, upcast=False), leaves, do)
    else:
        hi = _grads(lambda *x: spec(*x, upcast=True), leaves, do)
        lowp = _grads(lambda *x: spec(*x, upcast=False), leaves, do)
    return hi, lowp


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", list(FLASH_SHAPES))
def test_flash_attention_cuda(shape, dtype, causal):
    H, Hkv, D, Dv = FLASH_SHAPES[shape]
    dt = DTYPES[dtype]
    q, k, v, do = _inputs(2, H, Hkv, 317, D, Dv, dt)
    got = _grads(lambda a, b, c: flash_attention(a, b, c, causal=causal), (q, k, v), do)
    assert got[0].dtype == dt and torch.isfinite(got[0]).all()
    hi, lowp = _refs(lambda a, b, c, upcast: attention_ref(a, b, c, causal=causal, upcast=upcast), (q, k, v), do, dt)
    _check(f"flash {shape} {dtype}", got, hi, lowp)


def test_flash_backward_deterministic_cuda():
    q, k, v, do = _inputs(1, 8, 2, 1000, 128, 128, torch.bfloat16)
    a = _grads(lambda x, y, z: flash_attention(x, y, z, causal=True), (q, k, v), do)
    b = _grads(lambda x, y, z: flash_attention(x, y, z, causal=True), (q, k, v), do)
    for name, x, y in zip(("o", "dq", "dk", "dv"), a, b):
        assert torch.equal(x, y), f"{name} differs between two runs (the kernels use no atomics)"


# (feature map, D, M): one feature chunk (softmax d64 / d128 M 64) and split feature axes (M 256 "softmax" at d 128,
# "trig" M 64 at d 128, "softmax" M 256 at d 256: 32-feature chunks), the sizes over the old 64 x 128 limit
FEATURE_CASES = {"softmax-d128-m64": ("softmax", 128, 64), "softmax-d64-m64": ("softmax", 64, 64),
                 "trig-d64-m64": ("trig", 64, 64), "softmax-d128-m256": ("softmax", 128, 256),
                 "trig-d128-m64": ("trig", 128, 64), "softmax-d256-m256": ("softmax", 256, 256)}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(FEATURE_CASES))
def test_feature_attention_cuda(case, dtype, causal):
    fmap, D, M = FEATURE_CASES[case]
    dt = DTYPES[dtype]
    W = draw_features(D, M, family="orthogonal", seed=0, device="cuda")
    q, k, v, do = _inputs(2, 8, 2, 300, D, D, dt)
    leaves = [q * 0.5, k * 0.5, v] if fmap == "softmax" else [q, k, v]
    leaves = [x.detach().requires_grad_() for x in leaves]
    if fmap == "trig":
        tau = torch.tensor([0.8, 2.0], device="cuda", requires_grad=True)
        leaves.append(tau)

    def tri(*x):
        extra = dict(temperature=x[3]) if fmap == "trig" else {}
        return feature_attention(*x[:3], W, causal=causal, feature_map=fmap, backend="triton", **extra)

    def spec(*x, upcast):
        extra = dict(temperature=x[3]) if fmap == "trig" else {}
        return feature_attention_ref(*x[:3], W, causal=causal, feature_map=fmap, upcast=upcast, **extra)

    got = _grads(tri, leaves, do)
    hi, lowp = _refs(spec, leaves, do, dt)
    _check(f"feature {case} {dtype}", got, hi, lowp)


def test_feature_attention_auto_runs_triton_at_split_features():
    """M 256 at head dim 128 (over the old whole-F tile limit) runs the Triton kernels under backend="auto"."""
    W = draw_features(128, 256, seed=0, device="cuda")
    q, k, v, _ = _inputs(1, 4, 2, 200, 128, 128, torch.bfloat16)
    o = feature_attention(q, k, v, W, causal=True, backend="auto")
    tri = feature_attention(q, k, v, W, causal=True, backend="triton")
    assert torch.equal(o, tri)
