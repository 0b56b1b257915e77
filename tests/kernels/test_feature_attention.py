# SPDX-License-Identifier: MIT
"""Triton random-feature attention (``stackwise.kernels.features.triton``) against the float64 reference.

Checks: forward and every gradient (random upstream ``do``) against ``feature_attention_ref`` in float64 with
fla's relative-RMSE ratio per dtype; causal output at row t equals the bidirectional op on the prefix of length
t; the same W gives the same output (and gradients) on the "triton" and "torch" backends; backward is
bit-reproducible; NaN-poisoned outputs are fully written; bad inputs raise ``ValueError``.

Convergence (``test_softmax_features_converge``): with "softmax" (FAVOR+) features, the relative error to exact
softmax attention falls like M^-1/2, the Monte Carlo rate. Measured on D=16, T=64, q, k ~ 0.4 N(0, 1), mean of 4
seeds, M = 16..1024: log-log slopes -0.47 (gaussian, bidirectional) to -0.49 (orthogonal, causal); errors
0.26 -> 0.04 (gaussian) and 0.20 -> 0.03 (orthogonal, causal). The test asserts a monotone decrease and a
slope below -0.3, not the numbers.
"""

from __future__ import annotations

import math

import pytest
import torch

from stackwise.kernels import draw_features, feature_attention
from stackwise.kernels.features.reference import feature_attention_ref
from stackwise.kernels.features.triton import triton_feature_attention
from stackwise.kernels.flash.reference import attention_ref
from tests.utils import assert_close

# dtype -> allowed relative RMSE against the float64 reference (fla's ratio)
DTYPES = {"fp32": (torch.float32, 2e-5), "bf16": (torch.bfloat16, 1e-2), "fp16": (torch.float16, 2e-3)}
HEADS = {"mha": (4, 4), "gqa": (4, 2), "mqa": (4, 1)}


def _case(B, T, H, Hkv, D, Dv, M, fmap, family, dtype, causal):
    dims = f"D{D}" if D == Dv else f"D{D}x{Dv}"
    cid = f"B{B}-T{T}-H{H}-Hkv{Hkv}-{dims}-M{M}-{fmap}-{family}-{dtype}-{'causal' if causal else 'bidir'}"
    return pytest.param(B, T, H, Hkv, D, Dv, M, fmap, family, dtype, causal, id=cid)


def _grid():
    cases = []
    # fp32: full cross-product of mask, map, head sharing and head dims on a short sequence
    for causal in (True, False):
        for fmap in ("softmax", "trig"):
            for H, Hkv in HEADS.values():
                for D, Dv in ((64, 64), (40, 24)):
                    cases.append(_case(2, 17, H, Hkv, D, Dv, 32, fmap, "orthogonal", "fp32", causal))
    # fp32: awkward lengths, several segments (T 256), feature counts that are not powers of two, laplacian
    cases += [
        _case(1, 1, 2, 1, 64, 64, 32, "softmax", "gaussian", "fp32", True),
        _case(2, 1, 2, 2, 40, 40, 48, "trig", "laplacian", "fp32", False),
        _case(1, 113, 4, 2, 96, 64, 48, "softmax", "gaussian", "fp32", True),
        _case(1, 113, 2, 1, 64, 128, 16, "trig", "laplacian", "fp32", False),
        _case(1, 256, 2, 1, 64, 64, 64, "softmax", "orthogonal", "fp32", True),
        _case(1, 200, 2, 2, 32, 32, 24, "trig", "gaussian", "fp32", True),
    ]
    # sizes over the old whole-F tile limit (64 x 128), now split into feature chunks (32 under the interpreter,
    # 64 / 32 on a GPU): M 256 "softmax" at d 64 / 128, M 64 "trig" at d 128, M 256 "trig" at d 32; GQA/MQA, odd T
    cases += [
        _case(1, 70, 4, 2, 128, 128, 256, "softmax", "orthogonal", "fp32", True),
        _case(1, 45, 4, 1, 64, 64, 256, "softmax", "gaussian", "fp32", False),
        _case(2, 37, 2, 2, 128, 96, 64, "trig", "orthogonal", "fp32", True),
        _case(1, 70, 4, 2, 128, 128, 64, "trig", "gaussian", "fp32", False),
        _case(1, 33, 2, 1, 32, 32, 256, "trig", "laplacian", "fp32", True),
        _case(1, 19, 2, 1, 256, 64, 96, "softmax", "gaussian", "fp32", True),
    ]
    # low precision: a diagonal subset
    cases += [
        _case(1, 70, 4, 2, 64, 64, 32, "softmax", "orthogonal", "bf16", True),
        _case(1, 113, 2, 1, 40, 24, 32, "trig", "gaussian", "bf16", False),
        _case(2, 33, 2, 2, 64, 64, 64, "softmax", "gaussian", "fp16", False),
        _case(1, 129, 4, 1, 32, 32, 16, "trig", "orthogonal", "fp16", True),
        _case(1, 70, 4, 2, 128, 128, 256, "softmax", "orthogonal", "bf16", True),
        _case(1, 45, 2, 1, 128, 128, 64, "trig", "gaussian", "fp16", False),
    ]
    return cases


def _inputs(B, T, H, Hkv, D, Dv, dtype):
    q = torch.randn(B, H, T, D).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, T, D).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, T, Dv).to(dtype).requires_grad_()
    do = torch.randn(B, H, T, Dv).to(dtype)
    return q, k, v, do


@pytest.mark.parametrize("B, T, H, Hkv, D, Dv, M, fmap, family, dtype, causal", _grid())
def test_feature_attention_fwd_bwd(B, T, H, Hkv, D, Dv, M, fmap, family, dtype, causal):
    dtype, ratio = DTYPES[dtype]
    W = draw_features(D, M, family=family, seed=3)
    q, k, v, do = _inputs(B, T, H, Hkv, D, Dv, dtype)
    o = triton_feature_attention(q, k, v, W, causal=causal, feature_map=fmap)
    o.backward(do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = feature_attention_ref(*leaves, W.double(), causal=causal, feature_map=fmap)
    ref.backward(do.double())
    assert o.dtype == dtype and o.shape == (B, H, T, Dv)
    for name, r, x in zip(("o", "dq", "dk", "dv"), [ref] + [x.grad for x in leaves], (o, q.grad, k.grad, v.grad)):
        # atol: at T == 1 the exact dq is 0 and the kernel returns fp32 cancellation noise (~1e-6)
        assert_close(name, r, x, ratio, atol=1e-5)


@pytest.mark.parametrize("fmap", ["softmax", "trig"])
def test_causal_equals_bidirectional_on_prefixes(fmap):
    """Causal row t-1 == bidirectional op on the first t positions, across chunk (64) and segment (128) edges."""
    T = 150
    W = draw_features(32, 32, family="orthogonal", seed=1)
    q, k, v, _ = _inputs(1, T, 4, 2, 32, 16, torch.float32)
    q, k, v = q.detach(), k.detach(), v.detach()
    causal = triton_feature_attention(q, k, v, W, causal=True, feature_map=fmap)
    for t in (1, 63, 64, 65, 128, 129, 150):
        bidir = triton_feature_attention(q[:, :, :t], k[:, :, :t], v[:, :, :t], W, causal=False, feature_map=fmap)
        assert_close(f"o[t={t}]", bidir[:, :, t - 1], causal[:, :, t - 1], 1e-5, atol=1e-6)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("fmap", ["softmax", "trig"])
def test_backends_agree(fmap, causal):
    """The same W gives the same output and gradients on the "triton" and "torch" backends."""
    W = draw_features(64, 48, family="gaussian", seed=7)
    results = []
    for backend in ("triton", "torch"):
        torch.manual_seed(1)
        q, k, v, do = _inputs(1, 90, 4, 2, 64, 32, torch.float32)
        o = feature_attention(q, k, v, W, causal=causal, feature_map=fmap, backend=backend)
        o.backward(do)
        results.append([o, q.grad, k.grad, v.grad])
    for name, tri, ref in zip(("o", "dq", "dk", "dv"), *results):
        assert_close(name, ref, tri, 1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("family, causal", [("gaussian", False), ("orthogonal", True)])
def test_softmax_features_converge(backend, family, causal):
    """Error to exact softmax attention falls as M grows, at about the Monte Carlo rate M^-1/2.

    Measured slope of log(error) vs log(M): -0.47 (gaussian, bidirectional) and -0.49 (orthogonal, causal).
    """
    B, H, T, D = 1, 4, 64, 16
    q, k, v = torch.randn(B, H, T, D) * 0.4, torch.randn(B, H, T, D) * 0.4, torch.randn(B, H, T, D)
    exact = attention_ref(q.double(), k.double(), v.double(), causal=causal)
    ms = (16, 64, 256, 1024)
    errs = []
    for m in ms:
        e = []
        for seed in range(4):
            W = draw_features(D, m, family=family, seed=seed)
            o = feature_attention(q, k, v, W, causal=causal, feature_map="softmax", backend=backend)
            e.append(((o.double() - exact).norm() / exact.norm()).item())
        errs.append(sum(e) / len(e))
    x = torch.tensor([math.log(m) for m in ms])
    y = torch.tensor([math.log(e) for e in errs])
    slope = (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()
    summary = ", ".join(f"M={m}: {e:.4f}" for m, e in zip(ms, errs)) + f"; slope {slope:.3f}"
    assert all(a > b for a, b in zip(errs, errs[1:])), f"error does not fall with M: {summary}"
    assert slope < -0.3, f"error falls slower than expected: {summary}"


@pytest.mark.parametrize("fmap", ["softmax", "trig"])
def test_feature_backward_deterministic(fmap):
    """Two backward passes give bit-identical gradients (no atomics; M 80: three feature chunks summed in torch)."""
    W = draw_features(32, 80, seed=0)
    q, k, v, do = _inputs(1, 150, 4, 2, 32, 32, torch.float32)
    grads = []
    for _ in range(2):
        q.grad = k.grad = v.grad = None
        triton_feature_attention(q, k, v, W, causal=True, feature_map=fmap).backward(do)
        grads.append([x.grad.clone() for x in (q, k, v)])
    for name, a, b in zip(("dq", "dk", "dv"), *grads):
        assert torch.equal(a, b), f"{name} differs between two backward passes"


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_feature_outputs_written(causal):
    """Outputs are fully written: conftest poisons the kernel modules' torch.empty with NaN."""
    from stackwise.kernels.features import triton as feature_triton

    assert feature_triton.torch.empty(3).isnan().all(), "the NaN-poison fixture is not active"
    W = draw_features(40, 24, seed=0)
    q, k, v, do = _inputs(2, 67, 2, 1, 40, 24, torch.float32)
    o = triton_feature_attention(q, k, v, W, causal=causal)
    o.backward(do)
    for name, x in (("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(x).all(), f"{name} has {int((~torch.isfinite(x)).sum())} non-finite entries"


def test_feature_non_contiguous():
    """Views of [B, T, H, D] storage give the contiguous result."""
    B, T, H, D = 1, 40, 2, 32
    W = draw_features(D, 16, seed=0)
    q = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()
    k = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()
    v = torch.randn(B, T, H, D).transpose(1, 2).requires_grad_()
    do = torch.randn(B, H, T, D)
    o = triton_feature_attention(q, k, v, W, causal=True)
    o.backward(do)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = feature_attention_ref(*leaves, W.double(), causal=True)
    ref.backward(do.double())
    for name, r, x in zip(("o", "dq", "dk", "dv"), [ref] + [x.grad for x in leaves], (o, q.grad, k.grad, v.grad)):
        assert_close(name, r, x, 2e-5, atol=1e-6)


@pytest.mark.parametrize("arch", [80, 90])
def test_tiles_cover_every_supported_size(arch, monkeypatch):
    """Every head dim <= 256 and M <= 1024 gets feature-chunk tiles within MAX_TILE; only larger sizes are refused."""
    from stackwise.kernels.features import triton as ft

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the GPU rules, not the interpreter's
    for is_trig in (False, True):
        for d in (16, 24, 64, 96, 128, 192, 256):
            for m in (1, 48, 64, 256, 1000, 1024):
                t = ft.tiles(d, d, m, is_trig, arch)
                assert t is not None, f"no tiles for d {d}, M {m}, trig {is_trig}, sm_{arch}"
                assert t["BLOCK_F"] * max(t["BLOCK_D"], t["BLOCK_DV"]) <= ft.MAX_TILE, t
        assert ft.tiles(320, 320, 64, is_trig, arch) is None and ft.tiles(64, 64, 1025, is_trig, arch) is None
    assert ft.fits(128, 128, 256, False, torch.device("cpu")) and not ft.fits(512, 64, 64, True, torch.device("cpu"))


@pytest.mark.parametrize(
    "change, match",
    [
        pytest.param({"W": torch.randn(32, 8)}, "W must be", id="W-shape"),
        pytest.param({"W": torch.randn(16, 2000)}, "features", id="W-too-many-features"),
        pytest.param({"feature_map": "relu"}, "feature_map must be", id="feature_map"),
        pytest.param({"q": torch.randn(1, 4, 8, 16, dtype=torch.float64)}, "q dtype", id="q-dtype"),
        pytest.param({"v": torch.randn(1, 2, 8)}, "v must have 4 dims", id="v-rank"),
        pytest.param({"k": torch.randn(1, 2, 9, 16)}, "same length", id="k-length"),
    ],
)
@pytest.mark.parametrize("api", ["public", "kernel"])
def test_feature_bad_inputs(api, change, match):
    args = {"q": torch.randn(1, 4, 8, 16), "k": torch.randn(1, 2, 8, 16), "v": torch.randn(1, 2, 8, 16),
            "W": torch.randn(16, 8), "feature_map": "softmax"}  # fmt: skip
    args.update(change)
    fn = triton_feature_attention if api == "kernel" else lambda *a, **kw: feature_attention(*a, **kw, backend="triton")
    with pytest.raises(ValueError, match=match):
        fn(args["q"], args["k"], args["v"], args["W"], causal=True, feature_map=args["feature_map"])


def _no_lookahead_inputs(T, P, D, future, W):
    """Past keys of norm 34 (features far below a key-global max), future keys/values per ``future``."""
    H, Hkv, Dv = 4, 2, 16
    q = torch.randn(1, H, T, D)
    k = torch.randn(1, Hkv, T, D)
    k = k / k.norm(dim=-1, keepdim=True) * 34.0
    v = torch.randn(1, Hkv, T, Dv)
    do = torch.randn(1, H, T, Dv)
    do[:, :, P:] = 0  # the loss sees past outputs only
    k2, v2 = k.clone(), v.clone()
    fk = torch.randn(1, Hkv, T - P, D)
    if future == "small":
        # the issue's case: later keys of norm 6 have a much larger stabiliser than the earlier ones
        k2[:, :, P:] = fk / fk.norm(dim=-1, keepdim=True) * 6.0
    elif future == "aligned":
        # keys that maximise x'W - |x'|^2 / 2 for one feature column: the largest possible key max
        best = W.norm(dim=0).argmax()
        k2[:, :, P:] = (W[:, best] / D**-0.25).expand_as(fk)
    else:
        # huge norms and values: a global stabiliser would overflow or underflow the past
        k2[:, :, P:] = fk * 1e3
        v2[:, :, P:] = torch.randn(1, Hkv, T - P, Dv) * 1e4
    return q, (k, v), (k2, v2), do


@pytest.mark.parametrize("M", [64, 256])
@pytest.mark.parametrize("future", ["small", "aligned", "huge"])
@pytest.mark.parametrize("backend", ["torch", "triton", "ref"])
def test_causal_no_lookahead(backend, future, M):
    """Causal outputs and gradients at positions < P do not change when keys/values at >= P change.

    Regression: the "softmax" key stabiliser was a max over all T keys, so a later key could push earlier keys'
    features to exactly 0.0 in float32 (outputs 0.0 on the full sequence, nonzero on the prefix alone).
    T 150 spans the Triton chunks (64) and segments (128 under the interpreter); P 70 sits inside a chunk. M 256
    splits the feature axis into 8 chunks: the running stabiliser is a max over all of them.
    """
    T, P, D = 150, 70, 16
    W = draw_features(D, M, family="orthogonal", seed=5)
    q, (k, v), (k2, v2), do = _no_lookahead_inputs(T, P, D, future, W)

    def run(q, k, v, do):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        if backend == "ref":
            o = feature_attention_ref(*leaves, W, causal=True)
        else:
            o = feature_attention(*leaves, W, causal=True, feature_map="softmax", backend=backend)
        o.backward(do)
        return [o.detach()] + [x.grad for x in leaves]

    base, pert = run(q, k, v, do), run(q, k2, v2, do)
    prefix = run(q[:, :, :P], k[:, :, :P], v[:, :, :P], do[:, :, :P])
    assert base[0][:, :, :P].abs().amax(-1).min() > 0, "past outputs underflowed to 0"
    assert all(x.abs().amax() > 0 for x in base), "an output or gradient is all zeros"
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), base, pert, prefix):
        assert torch.isfinite(b).all(), f"{name} non-finite after perturbing the future"
        assert_close(f"{name} (future changed)", a[:, :, :P], b[:, :, :P], 1e-6, atol=1e-7)
        assert_close(f"{name} (prefix alone)", c, b[:, :, :P], 1e-6, atol=1e-7)


def test_causal_no_lookahead_issue_case():
    """The reported case: 6 keys of norm 34, then 6 of norm 6 (D 16, M 64): outputs 0-5 equal the prefix's."""
    D = 16
    W = draw_features(D, 64, seed=0)
    k = torch.randn(1, 1, 12, D)
    k = k / k.norm(dim=-1, keepdim=True)
    k[:, :, :6] *= 34
    k[:, :, 6:] *= 6
    q, v = torch.randn(1, 1, 12, D), torch.randn(1, 1, 12, D)
    for backend in ("torch", "triton"):
        full = feature_attention(q, k, v, W, causal=True, backend=backend)
        pre = feature_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], W, causal=True, backend=backend)
        assert full[:, :, :6].abs().amax(-1).min() > 0, f"{backend}: past outputs are 0.0"
        assert_close(f"{backend} o[:6]", pre, full[:, :, :6], 1e-6, atol=1e-7)
