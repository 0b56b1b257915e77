# SPDX-License-Identifier: MIT
"""Triton flash attention (``stackwise.kernels.flash.triton``) against the float64 reference.

Forward and every gradient (random upstream ``do``) are compared with ``attention_ref`` run in float64, with
flash-attn's tolerance: ``max|out - ref64| <= 2 * max|ref_lowp - ref64| + 1e-5`` (3x for gradients), where
``ref_lowp`` is the reference in the input dtype (``upcast=False``). fp32 runs the full grid on small shapes;
bf16/fp16 a diagonal subset. Runs on CPU under ``TRITON_INTERPRET=1`` (set in conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from stackwise.kernels import attention
from stackwise.kernels.flash.reference import attention_lse_ref, attention_ref
from stackwise.kernels.flash.triton import attention_fwd, flash_attention
from tests.utils import assert_within_noise

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _case(B, T, H, Hkv, D, Dv, dtype, causal):
    dims = f"D{D}" if D == Dv else f"D{D}x{Dv}"
    return pytest.param(B, T, H, Hkv, D, Dv, DTYPES[dtype], causal,
                        id=f"B{B}-T{T}-H{H}-Hkv{Hkv}-{dims}-{dtype}-{'causal' if causal else 'bidir'}")  # fmt: skip


def _grid():
    cases = []
    # fp32: full cross-product of mask, head sharing and head dims (incl. MLA 192/128 and odd 40, 96/64)
    for causal in (True, False):
        for H, Hkv in HEADS.values():
            for D, Dv in ((64, 64), (192, 128), (96, 64), (40, 40)):
                cases.append(_case(2 if H * 2 <= 8 else 1, 17, H, Hkv, D, Dv, "fp32", causal))
    # fp32: awkward lengths (1, one tail block, two blocks plus a tail)
    cases += [
        _case(1, 1, 4, 2, 64, 64, "fp32", True),
        _case(2, 1, 2, 1, 40, 40, "fp32", False),
        _case(1, 113, 4, 1, 192, 128, "fp32", True),
        _case(1, 113, 2, 2, 64, 64, "fp32", False),
        _case(1, 200, 2, 1, 64, 64, "fp32", True),
        _case(1, 256, 2, 2, 128, 128, "fp32", False),
    ]
    # low precision: a diagonal subset
    cases += [
        _case(2, 17, 4, 2, 64, 64, "bf16", True),
        _case(1, 113, 4, 1, 192, 128, "bf16", False),
        _case(1, 65, 2, 2, 96, 64, "bf16", True),
        _case(2, 17, 4, 4, 40, 40, "fp16", False),
        _case(1, 113, 4, 2, 64, 64, "fp16", True),
        _case(1, 33, 2, 1, 192, 128, "fp16", True),
    ]
    return cases


def _inputs(B, T, H, Hkv, D, Dv, dtype):
    q = torch.randn(B, H, T, D).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, T, D).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, Dv).to(dtype).requires_grad_()
    do = torch.randn(B, H, T, Dv).to(dtype)
    return q, k, v, do


def _ref_grads(q, k, v, do, causal, dtype, upcast):
    """Output and grads of the reference, in float64 (dtype=None) or the given dtype without upcast."""
    leaves = [x.detach().to(dtype or torch.float64).requires_grad_() for x in (q, k, v)]
    o = attention_ref(*leaves, causal=causal, upcast=upcast)
    o.backward(do.to(o.dtype))
    return [o] + [x.grad for x in leaves]


@pytest.mark.parametrize("B, T, H, Hkv, D, Dv, dtype, causal", _grid())
def test_attention_fwd_bwd(B, T, H, Hkv, D, Dv, dtype, causal):
    q, k, v, do = _inputs(B, T, H, Hkv, D, Dv, dtype)
    o = flash_attention(q, k, v, causal=causal)
    o.backward(do)
    ref = _ref_grads(q, k, v, do, causal, None, True)
    noisy = _ref_grads(q, k, v, do, causal, dtype, False)
    assert o.dtype == dtype and o.shape == (B, H, T, Dv)
    for name, factor, r, n, x in zip(("o", "dq", "dk", "dv"), (2, 3, 3, 3), ref, noisy, (o, q.grad, k.grad, v.grad)):
        assert_within_noise(name, r, x, n, factor)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_attention_lse(causal):
    """The saved LSE is the reference's log-sum-exp (what backward relies on)."""
    q, k, v, _ = _inputs(1, 70, 4, 2, 64, 32, torch.float32)
    _, lse = attention_fwd(q.detach(), k.detach(), v.detach(), causal=causal)
    ref = attention_lse_ref(q.double(), k.double(), causal=causal)
    assert (lse.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_attention_backward_deterministic(dtype):
    """Two backward passes give bit-identical dq, dk, dv (no atomics; dK/dV loop over the GQA group)."""
    q, k, v, do = _inputs(1, 113, 4, 1, 64, 64, DTYPES[dtype])
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        flash_attention(q, k, v, causal=True).backward(do)
        grads.append([x.grad.clone() for x in (q, k, v)])
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), f"{name} differs between two backward passes"


def test_attention_outputs_written():
    """Outputs are fully written: conftest poisons the kernel modules' torch.empty with NaN."""
    from stackwise.kernels.flash import triton as flash_triton

    assert flash_triton.torch.empty(3).isnan().all(), "the NaN-poison fixture is not active"
    q, k, v, do = _inputs(2, 67, 4, 2, 40, 24, torch.float32)
    o = flash_attention(q, k, v, causal=False)
    o.backward(do)
    for name, x in (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(x).all(), f"{name} has {int((~torch.isfinite(x)).sum())} non-finite entries"


def test_attention_non_contiguous():
    """[B, T, H, D] storage viewed as [B, H, T, D], and a last dim with stride 2, match the contiguous result."""
    B, T, H, Hkv, D = 1, 40, 4, 2, 32
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, Hkv, 2 * D)[..., ::2].transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, Hkv, D).transpose(1, 2).requires_grad_()
    do = torch.randn(B, H, T, D)
    o = flash_attention(q, k, v, causal=True)
    o.backward(do)
    ref = _ref_grads(q, k, v, do, True, None, True)
    for name, r, x in zip(("o", "dq", "dk", "dv"), ref, (o, q.grad, k.grad, v.grad)):
        assert x.shape == r.shape, name
        assert (x.double() - r).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_attention_backends_agree(causal):
    """The public op gives the same result on "triton" and "torch" (SDPA), forward and backward."""
    outs = []
    for backend in ("triton", "torch"):
        torch.manual_seed(1)
        q, k, v, do = _inputs(1, 50, 4, 2, 64, 64, torch.float32)
        o = attention(q, k, v, causal=causal, backend=backend)
        o.backward(do)
        outs.append([o, q.grad, k.grad, v.grad])
    for name, a, b in zip(("o", "dq", "dk", "dv"), *outs):
        assert (a - b).abs().max().item() < 1e-5, name


@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param({"q": torch.randn(2, 4, 8)}, "q must have 4 dims", id="q-rank"),
        pytest.param(
            {"k": torch.randn(1, 3, 8, 16), "v": torch.randn(1, 3, 8, 16)}, "multiple of k/v heads", id="k-heads"
        ),
        pytest.param({"v": torch.randn(1, 2, 9, 16)}, "same length", id="v-length"),
        pytest.param({"k": torch.randn(1, 2, 8, 32)}, "k head dim", id="k-dim"),
        pytest.param({"q": torch.randn(1, 4, 8, 16, dtype=torch.float64)}, "q dtype", id="q-dtype"),
        pytest.param({"v": torch.randn(1, 2, 8, 16).half()}, "share a dtype", id="v-dtype-mismatch"),
        pytest.param({"k": torch.randn(1, 2, 8, 16, device="meta")}, "one device", id="k-device"),
        pytest.param(
            {"q": torch.randn(1, 4, 8, 300), "k": torch.randn(1, 2, 8, 300)},
            "head dim must be <= 256",
            id="q-dim-too-large",
        ),
    ],
)
def test_attention_bad_inputs(change, match):
    args = {"q": torch.randn(1, 4, 8, 16), "k": torch.randn(1, 2, 8, 16), "v": torch.randn(1, 2, 8, 16)}
    args.update(change)
    with pytest.raises(ValueError, match=match):
        flash_attention(args["q"], args["k"], args["v"], causal=True)
