# SPDX-License-Identifier: MIT
"""Random-feature attention in Triton, linear in T, with the feature map fused into every kernel.

Computes exactly :func:`stackwise.kernels.features.reference.feature_attention_ref` (to fp32 rounding):
``o_i = sum_j a_ij v_j / max(sum_j a_ij, eps)``, ``a_ij = phi(q_i) . phi(k_j)`` (j <= i when causal),
with the "softmax" (FAVOR+, stabilised) and "trig" (random Fourier on unit-normalised inputs) maps of the
reference module docstring. phi(q), phi(k) are recomputed in registers from q, k and W and never written to
global memory; "trig" runs as one feature axis of width 2M over ``[W, W]`` (cos columns, then sin columns), on
inputs that :func:`~.reference.trig_normalise` scaled on the host (x^ = tau * s * x / |x|, tau the temperature).

Kernels, per (batch, head) and feature chunk, with F = M ("softmax") or 2M ("trig") features split into
``n_fc`` chunks of ``BLOCK_F`` (the third grid axis) and T split into ``n_split`` segments of ``CPS`` chunks of
``BLOCK_T`` rows (segments give the GPU parallelism along T):
- ``_feature_row_max_kernel``: the "softmax" map's stabilisers, a max over all feature chunks per row: max_f x'W
  per query, and ``x'W - |x'|^2 / 2`` per key, which torch reduces to the global key max per (batch, kv head)
  (bidirectional) or the running max (causal). All are detached in the reference and cancel in the ratio; a
  max over every chunk keeps each chunk's features on the same scale.
- ``_feature_attention_fwd_kernel_state``: per segment, kv head and feature chunk, S = phi(K)^T V [BLOCK_F, Dv],
  z = phi(K)^T 1 [BLOCK_F]. Torch sums the segments (bidirectional) or takes their exclusive prefix sum
  (causal); both deterministic.
- ``_feature_attention_fwd_kernel``: per feature chunk, the partial numerator ``phi(q) S`` and denominator
  ``phi(q) z`` (causal: each segment starts from its prefix state and scans its chunks, masked intra-chunk term
  plus state, then adds the chunk to the state). Both are sums over features, so torch sums the chunks' partials
  and only then divides: the normaliser sums over all features.
- backward (recomputes the features; W gets no gradient): with g_i = dO_i / den_i and
  h_i = -(dO_i . o_i) / den_i (torch, from the forward's totals), per feature chunk ``dphi(q_i) = g_i S_i^T +
  h_i z_i`` (``_bwd_kernel_dq``, same scan as the forward), ``R = sum_i phi(q_i)^T g_i``, ``r = sum_i h_i
  phi(q_i)`` over the query heads of the group (``_bwd_kernel_state``, suffix sums when causal), then per kv head
  in reverse order ``dphi(k_j) = R_j v_j + r_j`` and ``dv_j = phi(k_j) R_j`` plus the masked intra-chunk terms
  (``_bwd_kernel_dkv``). dx follows from dphi by the chain rule through the map (``_phi_bwd``); each chunk's
  share of dq, dk, dv is linear in it, so torch sums the chunks' fp32 partials. No atomics: deterministic.

Precision: loads are upcast to fp32 right after ``tl.load``; all matmuls are fp32 (``input_precision`` "ieee"
for fp32 inputs, "tf32" for bf16/fp16 inputs on GPU, where the inputs already carry that much noise).

Caveats: a program holds one feature chunk's state [BLOCK_F, Dv] and feature tile [BLOCK_T, BLOCK_F] in
registers, at most BLOCK_F x head dim = ``MAX_TILE`` (64 x 128; 32 x 256 at head dim 256), so every M up to
``MAX_FEATURES`` and head dim up to ``MAX_HEAD_DIM`` runs (:func:`tiles`, checked by
benchmarks/kernel_compile_check.py). The price: the row-max pre-pass, the query/key features recomputed once per
feature chunk, and fp32 partial outputs of n_fc times the output size (dq, dk, dv too in backward). Not yet run
on a GPU; CI runs it under ``TRITON_INTERPRET=1``. Inputs that are not contiguous are copied once
(``.contiguous()``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._utils import check_attention_inputs, interpreting
from .reference import FEATURE_MAPS, trig_normalise

# normaliser clamp, the reference's default eps
EPS = 1e-20
MAX_HEAD_DIM = 256
MAX_FEATURES = 1024


@triton.jit
def _phi_fwd(x, w, row_mask, offs_f, stab, x_scale, inv_sqrt_m,
             M: tl.constexpr, IS_TRIG: tl.constexpr, IS_QUERY: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """phi(x) [BLOCK_T, BLOCK_F] of one feature chunk (global indices offs_f) from x [BLOCK_T, BLOCK_D] and that
    chunk's w [BLOCK_D, BLOCK_F]; 0 outside the masks. ``stab`` [BLOCK_T] ("softmax" only) is the row's
    stabiliser over all features: max_f x'W for queries, the key max (own or global) for keys."""
    xs = x * x_scale
    proj = tl.dot(xs, w, input_precision=PREC)  # [BLOCK_T, BLOCK_F]
    if IS_TRIG:
        # x arrives normalised and temperature-scaled (trig_normalise on the host): x^ = x * x_scale
        f_mask = offs_f < 2 * M
        phi = tl.where((offs_f >= M)[None, :], tl.sin(proj), tl.cos(proj))
    else:
        f_mask = offs_f < M
        if IS_QUERY:
            # per-query stabiliser max_f(x'W) - |x'|^2/2: the |x'|^2 terms cancel
            phi = tl.exp(proj - stab[:, None])
        else:
            sq = 0.5 * tl.sum(xs * xs, 1)
            phi = tl.exp(proj - (sq + stab)[:, None])
    return tl.where(row_mask[:, None] & f_mask[None, :], phi, 0.0) * inv_sqrt_m


@triton.jit
def _phi_bwd(x, w, row_mask, offs_f, dphi, stab, x_scale, inv_sqrt_m,
             M: tl.constexpr, IS_TRIG: tl.constexpr, IS_QUERY: tl.constexpr, PREC: tl.constexpr):  # fmt: skip
    """One feature chunk's share of dL/dx [BLOCK_T, BLOCK_D] from dL/dphi [BLOCK_T, BLOCK_F] (linear in the chunk,
    so the chunks' shares add up); recomputes the features, stabilisers detached."""
    if IS_TRIG:
        # the normalisation's gradient is torch autograd's (trig_normalise ran on the host)
        mask = row_mask[:, None] & (offs_f < 2 * M)[None, :]
        xs = x * x_scale
        proj = tl.dot(xs, w, input_precision=PREC)
        dproj = dphi * tl.where((offs_f >= M)[None, :], tl.cos(proj), -tl.sin(proj))
        dproj = tl.where(mask, dproj, 0.0) * inv_sqrt_m
        dx = tl.dot(dproj, tl.trans(w), input_precision=PREC) * x_scale  # [BLOCK_T, BLOCK_D]
    else:
        phi = _phi_fwd(x, w, row_mask, offs_f, stab, x_scale, inv_sqrt_m, M, IS_TRIG, IS_QUERY, PREC)
        # d phi / d x' = phi * (W - x') for both maps (the stabilisers are constants)
        u = dphi * phi
        xs = x * x_scale
        dxs = tl.dot(u, tl.trans(w), input_precision=PREC) - xs * tl.sum(u, 1)[:, None]
        dx = dxs * x_scale
    return dx


@triton.jit
def _load_rows(base, rows, row_mask, offs_d, D: tl.constexpr):
    """Rows of a contiguous [T, D] matrix as fp32 [BLOCK_T, BLOCK_D] (zeros outside)."""
    x = tl.load(base + rows[:, None] * D + offs_d[None, :], mask=row_mask[:, None] & (offs_d < D)[None, :], other=0.0)
    return x.to(tl.float32)


@triton.jit
def _load_m(MR, bhkv, T, row):
    """The running key max m at ``row`` of kv head ``bhkv`` (a scalar); -inf for row -1 (empty prefix)."""
    val = tl.load(MR + bhkv * T + tl.maximum(row, 0))
    return tl.where(row >= 0, val, float("-inf"))


@triton.jit
def _key_stab(GMAX, RK, bhkv, T, rows, row_mask, RUN_MAX: tl.constexpr, BLOCK_T: tl.constexpr):
    """The key features' stabiliser per row [BLOCK_T]: the key's own max r_j (causal "softmax", rescaled by
    exp(r_j - m) where used) or the kv head's global max (bidirectional; 0 for "trig", which ignores it)."""
    if RUN_MAX:
        stab = tl.load(RK + bhkv * T + rows, mask=row_mask, other=0.0)
    else:
        stab = tl.zeros([BLOCK_T], dtype=tl.float32) + tl.load(GMAX + bhkv)
    return stab


@triton.jit
def _w_chunk(W, offs_d, offs_f, F_PAD):
    """The chunk's columns of the zero-padded projection [BLOCK_D, F_PAD]: [BLOCK_D, BLOCK_F]."""
    return tl.load(W + offs_d[:, None] * F_PAD + offs_f[None, :])


@triton.jit
def _feature_row_max_kernel(
    X, W, OUT, T, x_scale, N_FC,
    D: tl.constexpr, M: tl.constexpr, IS_KEY: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per row of X [rows, T, D]: max over all M features of x'W, minus |x'|^2 / 2 for keys ("softmax")."""
    pid_t = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    xs = _load_rows(X + row * T * D, rows, row_mask, offs_d, D) * x_scale  # [BLOCK_T, BLOCK_D]
    best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    # the feature chunks in turn: one [BLOCK_D, BLOCK_F] slice of W at a time
    for fc in range(0, N_FC):
        offs_f = fc * BLOCK_F + tl.arange(0, BLOCK_F)
        proj = tl.dot(xs, _w_chunk(W, offs_d, offs_f, N_FC * BLOCK_F), input_precision=PREC)  # [BLOCK_T, BLOCK_F]
        best = tl.maximum(best, tl.max(tl.where((offs_f < M)[None, :], proj, float("-inf")), 1))
    if IS_KEY:
        best = best - 0.5 * tl.sum(xs * xs, 1)
    tl.store(OUT + row * T + rows, best, mask=row_mask)


@triton.jit
def _feature_attention_fwd_kernel_state(
    K, V, W, GMAX, RK, MR, S, Z, T, x_scale, inv_sqrt_m, CPS,
    D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, IS_TRIG: tl.constexpr, RUN_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0).to(tl.int64)
    bhkv = tl.program_id(1).to(tl.int64)
    pid_f = tl.program_id(2).to(tl.int64)
    n_bhkv = tl.num_programs(1)
    f_pad = tl.num_programs(2) * BLOCK_F
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    w = _w_chunk(W, offs_d, offs_f, f_pad)  # [BLOCK_D, BLOCK_F]
    k_base = K + bhkv * T * D
    v_base = V + bhkv * T * DV
    st = tl.zeros([BLOCK_F, BLOCK_DV], dtype=tl.float32)
    z = tl.zeros([BLOCK_F], dtype=tl.float32)
    lo = pid_s * CPS
    hi = tl.minimum(lo + CPS, tl.cdiv(T, BLOCK_T))
    if RUN_MAX:
        # the segment's state at base m (running key max) at its last row
        base = _load_m(MR, bhkv, T, tl.minimum(hi * BLOCK_T, T) - 1)
    for c in range(lo, hi):
        rows = c * BLOCK_T + offs_t
        row_mask = rows < T
        k = _load_rows(k_base, rows, row_mask, offs_d, D)  # [BLOCK_T, BLOCK_D]
        v = _load_rows(v_base, rows, row_mask, offs_dv, DV)  # [BLOCK_T, BLOCK_DV]
        kstab = _key_stab(GMAX, RK, bhkv, T, rows, row_mask, RUN_MAX, BLOCK_T)
        pk = _phi_fwd(k, w, row_mask, offs_f, kstab, x_scale, inv_sqrt_m, M, IS_TRIG, False, PREC)
        if RUN_MAX:
            r = tl.load(RK + bhkv * T + rows, mask=row_mask, other=float("-inf"))
            pk = pk * tl.exp(r - base)[:, None]
        st += tl.dot(tl.trans(pk), v, input_precision=PREC)
        z += tl.sum(pk, 0)
    idx = pid_s * n_bhkv + bhkv
    tl.store(S + idx * f_pad * BLOCK_DV + offs_f[:, None] * BLOCK_DV + offs_dv[None, :], st)
    tl.store(Z + idx * f_pad + offs_f, z)


@triton.jit
def _feature_attention_fwd_kernel(
    Q, K, V, W, QS, GMAX, RK, MR, S, Z, PO, PDEN,
    H, HKV, T, x_scale, inv_sqrt_m, CPS,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    IS_TRIG: tl.constexpr, CAUSAL: tl.constexpr, RUN_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    pid_f = tl.program_id(2).to(tl.int64)
    n_bh = tl.num_programs(1)
    f_pad = tl.num_programs(2) * BLOCK_F
    b = bh // H
    bhkv = b * HKV + (bh % H) // GROUP
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    w = _w_chunk(W, offs_d, offs_f, f_pad)  # [BLOCK_D, BLOCK_F]
    # causal: the exclusive prefix state of this segment; bidirectional: the total state (this feature chunk's rows)
    if CAUSAL:
        idx = pid_s * (n_bh // GROUP) + bhkv
    else:
        idx = bhkv
    st = tl.load(S + idx * f_pad * BLOCK_DV + offs_f[:, None] * BLOCK_DV + offs_dv[None, :])  # [BLOCK_F, BLOCK_DV]
    z = tl.load(Z + idx * f_pad + offs_f)  # [BLOCK_F]
    q_base = Q + bh * T * D
    k_base = K + bhkv * T * D
    v_base = V + bhkv * T * DV
    # this feature chunk's partial numerator [T, DV] and denominator [T]; the host sums the chunks
    po_base = PO + (pid_f * n_bh + bh) * T * DV
    pden_base = PDEN + (pid_f * n_bh + bh) * T
    lo = pid_s * CPS
    hi = tl.minimum(lo + CPS, tl.cdiv(T, BLOCK_T))
    if RUN_MAX:
        # the prefix state's base: the running key max just before this segment
        mprev = _load_m(MR, bhkv, T, lo * BLOCK_T - 1)
    for c in range(lo, hi):
        rows = c * BLOCK_T + offs_t
        row_mask = rows < T
        q = _load_rows(q_base, rows, row_mask, offs_d, D)
        qs = tl.load(QS + bh * T + rows, mask=row_mask, other=0.0)
        pq = _phi_fwd(q, w, row_mask, offs_f, qs, x_scale, inv_sqrt_m, M, IS_TRIG, True, PREC)  # [BLOCK_T, BLOCK_F]
        num = tl.dot(pq, st, input_precision=PREC)  # [BLOCK_T, BLOCK_DV]
        den = tl.sum(pq * z[None, :], 1)  # [BLOCK_T]
        if RUN_MAX:
            # query i sees keys <= i at base m_i (+inf on padded rows: weight 0, never inf * 0)
            mi = tl.load(MR + bhkv * T + rows, mask=row_mask, other=float("inf"))
            r = tl.load(RK + bhkv * T + rows, mask=row_mask, other=float("-inf"))
            sc = tl.exp(mprev - mi)
            num = num * sc[:, None]
            den = den * sc
        if CAUSAL:
            k = _load_rows(k_base, rows, row_mask, offs_d, D)
            v = _load_rows(v_base, rows, row_mask, offs_dv, DV)
            kstab = _key_stab(GMAX, RK, bhkv, T, rows, row_mask, RUN_MAX, BLOCK_T)
            pk = _phi_fwd(k, w, row_mask, offs_f, kstab, x_scale, inv_sqrt_m, M, IS_TRIG, False, PREC)
            # this chunk's share of a = phi(q) phi(k)^T (a sum over features, so the shares add up)
            a = tl.dot(pq, tl.trans(pk), input_precision=PREC)  # [BLOCK_T, BLOCK_T]
            if RUN_MAX:
                cw = tl.exp(tl.where(rows[:, None] >= rows[None, :], r[None, :] - mi[:, None], float("-inf")))
                a = a * cw
            a = tl.where(rows[:, None] >= rows[None, :], a, 0.0)
            num += tl.dot(a, v, input_precision=PREC)
            den += tl.sum(a, 1)
            if RUN_MAX:
                mnew = _load_m(MR, bhkv, T, tl.minimum(c * BLOCK_T + BLOCK_T, T) - 1)
                grow = tl.exp(mprev - mnew)
                pkw = pk * tl.exp(r - mnew)[:, None]
                st = st * grow + tl.dot(tl.trans(pkw), v, input_precision=PREC)
                z = z * grow + tl.sum(pkw, 0)
                mprev = mnew
            else:
                st += tl.dot(tl.trans(pk), v, input_precision=PREC)
                z += tl.sum(pk, 0)
        tl.store(po_base + rows[:, None] * DV + offs_dv[None, :], num,
                 mask=row_mask[:, None] & (offs_dv < DV)[None, :])  # fmt: skip
        tl.store(pden_base + rows, den, mask=row_mask)


@triton.jit
def _feature_attention_bwd_kernel_dq(
    Q, K, V, W, QS, GMAX, RK, MR, S, Z, DO, HH, RDEN, PDQ,
    H, HKV, T, x_scale, inv_sqrt_m, CPS,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    IS_TRIG: tl.constexpr, CAUSAL: tl.constexpr, RUN_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    pid_f = tl.program_id(2).to(tl.int64)
    n_bh = tl.num_programs(1)
    f_pad = tl.num_programs(2) * BLOCK_F
    b = bh // H
    bhkv = b * HKV + (bh % H) // GROUP
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    w = _w_chunk(W, offs_d, offs_f, f_pad)
    if CAUSAL:
        idx = pid_s * (n_bh // GROUP) + bhkv
    else:
        idx = bhkv
    st = tl.load(S + idx * f_pad * BLOCK_DV + offs_f[:, None] * BLOCK_DV + offs_dv[None, :])  # [BLOCK_F, BLOCK_DV]
    z = tl.load(Z + idx * f_pad + offs_f)
    q_base = Q + bh * T * D
    k_base = K + bhkv * T * D
    v_base = V + bhkv * T * DV
    lo = pid_s * CPS
    hi = tl.minimum(lo + CPS, tl.cdiv(T, BLOCK_T))
    if RUN_MAX:
        mprev = _load_m(MR, bhkv, T, lo * BLOCK_T - 1)
    for c in range(lo, hi):
        rows = c * BLOCK_T + offs_t
        row_mask = rows < T
        q = _load_rows(q_base, rows, row_mask, offs_d, D)
        qs = tl.load(QS + bh * T + rows, mask=row_mask, other=0.0)
        do = _load_rows(DO + bh * T * DV, rows, row_mask, offs_dv, DV)  # [BLOCK_T, BLOCK_DV]
        pq = _phi_fwd(q, w, row_mask, offs_f, qs, x_scale, inv_sqrt_m, M, IS_TRIG, True, PREC)
        # g = dO / den and h = -(dO . o) / den (0 where the clamp is active) come from the forward's totals
        g = do * tl.load(RDEN + bh * T + rows, mask=row_mask, other=0.0)[:, None]  # [BLOCK_T, BLOCK_DV]
        hh = tl.load(HH + bh * T + rows, mask=row_mask, other=0.0)  # [BLOCK_T]
        dpq = tl.dot(g, tl.trans(st), input_precision=PREC) + hh[:, None] * z[None, :]  # [BLOCK_T, BLOCK_F]
        if RUN_MAX:
            mi = tl.load(MR + bhkv * T + rows, mask=row_mask, other=float("inf"))
            r = tl.load(RK + bhkv * T + rows, mask=row_mask, other=float("-inf"))
            dpq = dpq * tl.exp(mprev - mi)[:, None]
        if CAUSAL:
            k = _load_rows(k_base, rows, row_mask, offs_d, D)
            v = _load_rows(v_base, rows, row_mask, offs_dv, DV)
            kstab = _key_stab(GMAX, RK, bhkv, T, rows, row_mask, RUN_MAX, BLOCK_T)
            pk = _phi_fwd(k, w, row_mask, offs_f, kstab, x_scale, inv_sqrt_m, M, IS_TRIG, False, PREC)
            causal = rows[:, None] >= rows[None, :]
            mm = tl.where(causal, tl.dot(g, tl.trans(v), input_precision=PREC) + hh[:, None], 0.0)
            if RUN_MAX:
                mm = mm * tl.exp(tl.where(causal, r[None, :] - mi[:, None], float("-inf")))
            dpq += tl.dot(mm, pk, input_precision=PREC)
            if RUN_MAX:
                mnew = _load_m(MR, bhkv, T, tl.minimum(c * BLOCK_T + BLOCK_T, T) - 1)
                grow = tl.exp(mprev - mnew)
                pkw = pk * tl.exp(r - mnew)[:, None]
                st = st * grow + tl.dot(tl.trans(pkw), v, input_precision=PREC)
                z = z * grow + tl.sum(pkw, 0)
                mprev = mnew
            else:
                st += tl.dot(tl.trans(pk), v, input_precision=PREC)
                z += tl.sum(pk, 0)
        dq = _phi_bwd(q, w, row_mask, offs_f, dpq, qs, x_scale, inv_sqrt_m, M, IS_TRIG, True, PREC)
        tl.store(PDQ + (pid_f * n_bh + bh) * T * D + rows[:, None] * D + offs_d[None, :], dq,
                 mask=row_mask[:, None] & (offs_d < D)[None, :])  # fmt: skip


@triton.jit
def _feature_attention_bwd_kernel_state(
    Q, W, QS, MR, DO, HH, RDEN, R, RZ,
    H, HKV, T, x_scale, inv_sqrt_m, CPS,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr, IS_TRIG: tl.constexpr,
    RUN_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0).to(tl.int64)
    bhkv = tl.program_id(1).to(tl.int64)
    pid_f = tl.program_id(2).to(tl.int64)
    n_bhkv = tl.num_programs(1)
    f_pad = tl.num_programs(2) * BLOCK_F
    b = bhkv // HKV
    hkv = bhkv % HKV
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    w = _w_chunk(W, offs_d, offs_f, f_pad)
    rs = tl.zeros([BLOCK_F, BLOCK_DV], dtype=tl.float32)
    rz = tl.zeros([BLOCK_F], dtype=tl.float32)
    lo = pid_s * CPS
    hi = tl.minimum(lo + CPS, tl.cdiv(T, BLOCK_T))
    if RUN_MAX:
        # the segment's state at base m at its first row (m is non-decreasing, so every weight is <= 1)
        base = _load_m(MR, bhkv, T, lo * BLOCK_T)
    for c in range(lo, hi):
        rows = c * BLOCK_T + offs_t
        row_mask = rows < T
        if RUN_MAX:
            wq = tl.exp(base - tl.load(MR + bhkv * T + rows, mask=row_mask, other=float("inf")))
        else:
            wq = tl.where(row_mask, 1.0, 0.0)
        # the group's query heads in a fixed order (deterministic sum)
        for g_idx in range(GROUP):
            bh = b * H + hkv * GROUP + g_idx
            q = _load_rows(Q + bh * T * D, rows, row_mask, offs_d, D)
            qs = tl.load(QS + bh * T + rows, mask=row_mask, other=0.0)
            pq = _phi_fwd(q, w, row_mask, offs_f, qs, x_scale, inv_sqrt_m, M, IS_TRIG, True, PREC)
            do = _load_rows(DO + bh * T * DV, rows, row_mask, offs_dv, DV)
            rden = tl.load(RDEN + bh * T + rows, mask=row_mask, other=0.0)
            hh = tl.load(HH + bh * T + rows, mask=row_mask, other=0.0)
            rs += tl.dot(tl.trans(pq), do * (rden * wq)[:, None], input_precision=PREC)
            rz += tl.sum(pq * (hh * wq)[:, None], 0)
    idx = pid_s * n_bhkv + bhkv
    tl.store(R + idx * f_pad * BLOCK_DV + offs_f[:, None] * BLOCK_DV + offs_dv[None, :], rs)
    tl.store(RZ + idx * f_pad + offs_f, rz)


@triton.jit
def _feature_attention_bwd_kernel_dkv(
    Q, K, V, W, QS, GMAX, RK, MR, R, RZ, DO, HH, RDEN, PDK, PDV,
    H, HKV, T, x_scale, inv_sqrt_m, CPS,
    GROUP: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, M: tl.constexpr,
    IS_TRIG: tl.constexpr, CAUSAL: tl.constexpr, RUN_MAX: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_F: tl.constexpr,
    PREC: tl.constexpr,
):  # fmt: skip
    pid_s = tl.program_id(0).to(tl.int64)
    bhkv = tl.program_id(1).to(tl.int64)
    pid_f = tl.program_id(2).to(tl.int64)
    n_bhkv = tl.num_programs(1)
    f_pad = tl.num_programs(2) * BLOCK_F
    b = bhkv // HKV
    hkv = bhkv % HKV
    offs_t = tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    w = _w_chunk(W, offs_d, offs_f, f_pad)
    # causal: the exclusive suffix state (later segments); bidirectional: the total
    if CAUSAL:
        idx = pid_s * n_bhkv + bhkv
    else:
        idx = bhkv
    rs = tl.load(R + idx * f_pad * BLOCK_DV + offs_f[:, None] * BLOCK_DV + offs_dv[None, :])  # [BLOCK_F, BLOCK_DV]
    rz = tl.load(RZ + idx * f_pad + offs_f)  # [BLOCK_F]
    k_base = K + bhkv * T * D
    v_base = V + bhkv * T * DV
    lo = pid_s * CPS
    hi = tl.minimum(lo + CPS, tl.cdiv(T, BLOCK_T))
    if RUN_MAX:
        # the suffix state's base: m at the first row after this segment (at the last row for the last one)
        mb = _load_m(MR, bhkv, T, tl.minimum(hi * BLOCK_T, T - 1))
    # chunks in reverse: the state holds the queries after the current chunk
    for i in range(0, hi - lo):
        c = hi - 1 - i
        rows = c * BLOCK_T + offs_t
        row_mask = rows < T
        k = _load_rows(k_base, rows, row_mask, offs_d, D)
        v = _load_rows(v_base, rows, row_mask, offs_dv, DV)  # [BLOCK_T, BLOCK_DV]
        kstab = _key_stab(GMAX, RK, bhkv, T, rows, row_mask, RUN_MAX, BLOCK_T)
        pk = _phi_fwd(k, w, row_mask, offs_f, kstab, x_scale, inv_sqrt_m, M, IS_TRIG, False, PREC)
        dpk = tl.dot(v, tl.trans(rs), input_precision=PREC) + rz[None, :]  # [BLOCK_T, BLOCK_F]
        dv = tl.dot(pk, rs, input_precision=PREC)  # [BLOCK_T, BLOCK_DV]
        if RUN_MAX:
            r = tl.load(RK + bhkv * T + rows, mask=row_mask, other=float("-inf"))
            mi = tl.load(MR + bhkv * T + rows, mask=row_mask, other=float("inf"))
            wk = tl.exp(r - mb)
            dpk = dpk * wk[:, None]
            dv = dv * wk[:, None]
            # rebase the state to m at this chunk's first row before adding the chunk's queries
            mb_new = _load_m(MR, bhkv, T, c * BLOCK_T)
            shrink = tl.exp(mb_new - mb)
            rs = rs * shrink
            rz = rz * shrink
            mb = mb_new
            wq = tl.exp(mb - mi)
        if CAUSAL:
            # causal[i, j]: query row i sees key row j
            causal = rows[:, None] >= rows[None, :]
            if RUN_MAX:
                cw = tl.exp(tl.where(causal, r[None, :] - mi[:, None], float("-inf")))
            for g_idx in range(GROUP):
                bh = b * H + hkv * GROUP + g_idx
                q = _load_rows(Q + bh * T * D, rows, row_mask, offs_d, D)
                qs = tl.load(QS + bh * T + rows, mask=row_mask, other=0.0)
                pq = _phi_fwd(q, w, row_mask, offs_f, qs, x_scale, inv_sqrt_m, M, IS_TRIG, True, PREC)
                do = _load_rows(DO + bh * T * DV, rows, row_mask, offs_dv, DV)
                rden = tl.load(RDEN + bh * T + rows, mask=row_mask, other=0.0)
                hh = tl.load(HH + bh * T + rows, mask=row_mask, other=0.0)
                g = do * rden[:, None]  # [BLOCK_T, BLOCK_DV]
                mm = tl.where(causal, tl.dot(g, tl.trans(v), input_precision=PREC) + hh[:, None], 0.0)
                a = tl.where(causal, tl.dot(pq, tl.trans(pk), input_precision=PREC), 0.0)  # [BLOCK_T, BLOCK_T]
                if RUN_MAX:
                    mm = mm * cw
                    a = a * cw
                    g_s = g * wq[:, None]
                    hh_s = hh * wq
                else:
                    g_s = g
                    hh_s = hh
                dpk += tl.dot(tl.trans(mm), pq, input_precision=PREC)
                dv += tl.dot(tl.trans(a), g, input_precision=PREC)
                rs += tl.dot(tl.trans(pq), g_s, input_precision=PREC)
                rz += tl.sum(pq * hh_s[:, None], 0)
        dk = _phi_bwd(k, w, row_mask, offs_f, dpk, kstab, x_scale, inv_sqrt_m, M, IS_TRIG, False, PREC)
        part = pid_f * n_bhkv + bhkv
        tl.store(PDK + part * T * D + rows[:, None] * D + offs_d[None, :], dk,
                 mask=row_mask[:, None] & (offs_d < D)[None, :])  # fmt: skip
        tl.store(PDV + part * T * DV + rows[:, None] * DV + offs_dv[None, :], dv,
                 mask=row_mask[:, None] & (offs_dv < DV)[None, :])  # fmt: skip


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, W: torch.Tensor, feature_map: str) -> None:
    """Validate the feature kernels' inputs (public checks plus the kernels' own limits).

    Raises:
        ValueError: bad shapes/dtypes/devices naming the argument, T != S, too large D or M, unknown map.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.
    """
    check_attention_inputs(q, k, v)
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"triton_feature_attention runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got q on {q.device}; "
            "use stackwise.kernels.feature_attention(..., backend='torch')"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"feature attention needs T == S, got q length {q.shape[2]} and k length {k.shape[2]}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise ValueError(f"head dims must be <= {MAX_HEAD_DIM}, got q {q.shape[-1]}, v {v.shape[-1]}")
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.shape[0] != q.shape[-1]:
        got = tuple(W.shape) if isinstance(W, torch.Tensor) else type(W).__name__
        raise ValueError(f"W must be [head_dim={q.shape[-1]}, n_features], got {got}; use draw_features()")
    if W.shape[1] > MAX_FEATURES:
        raise ValueError(f"W has {W.shape[1]} features; at most {MAX_FEATURES} are supported")
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {list(FEATURE_MAPS)}, got {feature_map!r}")


def _pow2(n: int) -> int:
    """n padded to a power of two >= 16 (``tl.dot`` needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(n))


# one feature chunk's tiles are at most BLOCK_F x head dim = this many elements: the state [BLOCK_F, Dv], the
# projection [D, BLOCK_F] and their transposes are staged through shared memory whole (a whole-F tile needed
# 240 KiB on sm_80 for "trig" M 64 at D 128, 400+ KiB at M 256; benchmarks/kernel_compile_check.py)
MAX_TILE = 64 * 128
# the feature axis runs in chunks of this many features (fewer at head dim 256, to stay within MAX_TILE), one
# program per chunk; the interpreter uses 32 so that CI splits F already at M 48 ("softmax") / 24 ("trig")
FEATURE_CHUNK = 64
INTERPRET_FEATURE_CHUNK = 32


def tiles(D: int, DV: int, M: int, is_trig: bool, arch: int = 90) -> dict[str, int] | None:
    """Block sizes, warps and stages of every feature kernel on sm_<arch>, or None past the kernels' limits.

    The F = M ("softmax") or 2M ("trig") features run in chunks of BLOCK_F = 64 (at head dim 256: 32 on sm_90,
    16 on sm_8x, so a chunk's tiles stay within ``MAX_TILE`` and shared memory), one program per chunk: any M up to ``MAX_FEATURES`` and head dims up to
    ``MAX_HEAD_DIM`` run. Beyond those (None) ``backend="auto"`` runs the torch path and "triton" raises.
    Chunks of 64 rows (Hopper's ``wgmma`` needs 64), 32 rows on sm_8x once the tiles pass 64 x 64 (shared
    memory: the dK/dV kernel needs 160 KiB of sm_80's 163 at 64 rows, 104 KiB at 32) and on every arch at head
    dim 256 (296 KiB on sm_90 at 64 rows, 144 KiB at 32; those kernels use ``mma.sync``, not ``wgmma``); one
    stage (the loop bodies are long and pipelining the chunk loads doubled the shared memory); 4 warps up to a
    64 x 64 state, 8 beyond. benchmarks/kernel_compile_check.py compiles exactly these for sm_80 and sm_90.
    """
    if max(D, DV) > MAX_HEAD_DIM or M > MAX_FEATURES:
        return None
    bd, bdv, n_f = _pow2(D), _pow2(DV), 2 * M if is_trig else M
    if interpreting():
        bf = min(_pow2(n_f), INTERPRET_FEATURE_CHUNK)
        return dict(BLOCK_T=64, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_F=bf, num_warps=4, num_stages=1)
    wide = max(bd, bdv) > 128
    bf = min(_pow2(n_f), FEATURE_CHUNK, MAX_TILE // max(bd, bdv))
    if wide and arch < 90:
        # the bf16/fp16 bidirectional dK/dV kernel needs 164 KiB of sm_80's 163 at 32 features
        bf = min(bf, 16)
    size = bf * max(bd, bdv)
    # head dim 256: the [BLOCK_T, 256] q/k/v/dO tiles alone outgrow sm_90's 227 KiB at 64 rows (296 KiB)
    bt = 32 if wide or (arch < 90 and size > 64 * 64) else 64
    return dict(BLOCK_T=bt, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_F=bf, num_warps=4 if bf * bdv <= 64 * 64 else 8,
                num_stages=1)


def fits(D: int, DV: int, M: int, is_trig: bool, device: torch.device) -> bool:
    """True when the Triton feature kernels run these sizes: head dims <= ``MAX_HEAD_DIM`` and M <= ``MAX_FEATURES``.

    The feature axis is split into chunks (:func:`tiles`), so this no longer depends on M x head dim; larger
    head dims or feature counts run the torch path under ``backend="auto"``.
    """
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return tiles(D, DV, M, is_trig, 10 * major + minor) is not None
    return tiles(D, DV, M, is_trig) is not None


class _Plan:
    """Shapes, blocks, T segments, feature chunks and the padded fp32 projection shared by forward and backward."""

    def __init__(self, q, k, v, W, *, causal, feature_map, scale):
        self.B, self.H, self.T, self.D = q.shape
        self.HKV, self.DV = k.shape[1], v.shape[-1]
        self.M = W.shape[1]
        self.causal = bool(causal)
        self.is_trig = feature_map == "trig"
        scale = self.D**-0.5 if scale is None else float(scale)
        # x' = x * sqrt(scale) ("softmax"); "trig" inputs arrive as x^ from trig_normalise (scale applied)
        self.x_scale = 1.0 if self.is_trig else math.sqrt(scale)
        self.inv_sqrt_m = 1.0 / math.sqrt(self.M)
        F = 2 * self.M if self.is_trig else self.M
        arch = 90
        if q.device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(q.device)
            arch = 10 * major + minor
        t = tiles(self.D, self.DV, self.M, self.is_trig, arch)
        if t is None:
            raise ValueError(
                f"the Triton feature kernels take head dims <= {MAX_HEAD_DIM} and at most {MAX_FEATURES} features, "
                f"got head dim {self.D}/{self.DV} with {self.M} {feature_map!r} features; use backend='auto' or "
                "'torch'"
            )
        self.BLOCK_D, self.BLOCK_DV, self.BLOCK_F, self.BLOCK_T = t["BLOCK_D"], t["BLOCK_DV"], t["BLOCK_F"], t["BLOCK_T"]
        # feature chunks: the third grid axis of every kernel but the row max
        self.n_fc = triton.cdiv(F, self.BLOCK_F)
        self.F_PAD = self.n_fc * self.BLOCK_F
        w = W.to(device=q.device, dtype=torch.float32)
        w = torch.cat([w, w], dim=1) if self.is_trig else w
        self.w = torch.zeros(self.BLOCK_D, self.F_PAD, device=q.device, dtype=torch.float32)
        self.w[: self.D, :F] = w
        self.prec = "ieee" if q.dtype == torch.float32 else "tf32"
        n_blocks = triton.cdiv(self.T, self.BLOCK_T)
        if interpreting():
            # two chunks per segment, so CI covers both the in-program scan and the segment prefix sums
            self.cps = 2
        else:
            # the feature chunks already multiply the programs
            sms = torch.cuda.get_device_properties(q.device).multi_processor_count
            splits = max(1, min(n_blocks, (4 * sms) // (self.B * self.H * self.n_fc)))
            self.cps = triton.cdiv(n_blocks, splits)
        self.n_split = triton.cdiv(n_blocks, self.cps)
        self.num_warps, self.num_stages = t["num_warps"], t["num_stages"]
        # causal "softmax": per-query running key max instead of the global one (no look-ahead)
        self.run_max = self.causal and not self.is_trig

    def meta(self) -> dict:
        return dict(
            D=self.D, DV=self.DV, M=self.M, IS_TRIG=self.is_trig, BLOCK_T=self.BLOCK_T, BLOCK_D=self.BLOCK_D,
            BLOCK_DV=self.BLOCK_DV, BLOCK_F=self.BLOCK_F, PREC=self.prec, num_warps=self.num_warps, num_stages=self.num_stages,
        )  # fmt: skip


def _row_max(x: torch.Tensor, plan: _Plan, is_key: bool) -> torch.Tensor:
    """Per row of x [B, H', T, D]: max over all features of x'W (minus |x'|^2 / 2 for keys), [B * H', T] fp32."""
    n_rows = x.shape[0] * x.shape[1]
    out = torch.empty(n_rows, plan.T, device=x.device, dtype=torch.float32)
    _feature_row_max_kernel[(triton.cdiv(plan.T, plan.BLOCK_T), n_rows)](
        x, plan.w, out, plan.T, plan.x_scale, plan.n_fc, D=plan.D, M=plan.M, IS_KEY=is_key, BLOCK_T=plan.BLOCK_T,
        BLOCK_D=plan.BLOCK_D, BLOCK_F=plan.BLOCK_F, PREC=plan.prec, num_warps=plan.num_warps,
        num_stages=plan.num_stages,
    )  # fmt: skip
    return out


def _stabilisers(q: torch.Tensor, k: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, ...]:
    """The "softmax" map's stabilisers, each a max over all feature chunks (detached, they cancel in the ratio).

    Returns (query max [B * H, T], global key max [B * Hkv], per-key max r and running max m [B * Hkv, T]).
    Bidirectional uses the global key max; causal uses r and m = cummax(r): query i only sees keys <= i, so
    its stabiliser must not depend on later keys. "trig" needs none (zeros).
    """
    n_kv = plan.B * plan.HKV
    if plan.is_trig:
        zero = torch.zeros(n_kv, device=k.device, dtype=torch.float32)
        return torch.zeros(plan.B * plan.H, plan.T, device=q.device, dtype=torch.float32), zero, zero, zero
    qs = _row_max(q, plan, is_key=False)
    r = _row_max(k, plan, is_key=True)
    if plan.run_max:
        return qs, r[:, 0].contiguous(), r, r.cummax(dim=1).values.contiguous()
    gmax = r.amax(dim=1)
    return qs, gmax, gmax, gmax


def _prefix_rebased(part: torch.Tensor, m: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Causal "softmax": exclusive prefix sums of segment states, each segment's at base m at its last row.

    Segment s's prefix is returned at base m just before the segment; an older state is scaled by
    exp(old base - new base) <= 1 when the running max grows (flash attention's running-max rescale).
    """
    ends = [min((s + 1) * plan.cps * plan.BLOCK_T, plan.T) - 1 for s in range(plan.n_split)]
    extra = (1,) * (part.dim() - 2)
    out = [torch.zeros_like(part[0])]
    for s in range(1, plan.n_split):
        prev = out[-1]
        if s > 1:
            prev = prev * torch.exp(m[:, ends[s - 2]] - m[:, ends[s - 1]]).view(-1, *extra)
        out.append(prev + part[s - 1])
    return torch.stack(out, dim=0)


def _suffix_rebased(part: torch.Tensor, m: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Causal "softmax": exclusive suffix sums of segment states, each segment's at base m at its first row.

    Segment s's suffix is returned at base m at the first row of segment s + 1 (m at the last row for the
    last segment, whose suffix is empty); m is non-decreasing, so every rescale factor is <= 1.
    """
    n = plan.n_split
    firsts = [s * plan.cps * plan.BLOCK_T for s in range(n)]
    bases = [min((s + 1) * plan.cps * plan.BLOCK_T, plan.T - 1) for s in range(n)]
    extra = (1,) * (part.dim() - 2)
    out = [torch.zeros_like(part[0])]
    for s in range(n - 2, -1, -1):
        nxt = out[-1] * torch.exp(m[:, bases[s]] - m[:, bases[s + 1]]).view(-1, *extra)
        out.append(nxt + part[s + 1] * torch.exp(m[:, bases[s]] - m[:, firsts[s + 1]]).view(-1, *extra))
    return torch.stack(out[::-1], dim=0)


def _segment_scan(x: torch.Tensor, causal: bool, reverse: bool) -> torch.Tensor:
    """Per-segment partial states [n_split, ...] -> total [1, ...], or exclusive prefix (suffix) sums."""
    if not causal:
        return x.sum(0, keepdim=True)
    if reverse:
        return _segment_scan(x.flip(0), causal, False).flip(0)
    return torch.cat([torch.zeros_like(x[:1]), x[:-1].cumsum(0)], dim=0)


def feature_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: _Plan
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernels.

    Args:
        q (torch.Tensor): [B, H, T, D] contiguous.
        k (torch.Tensor): [B, Hkv, T, D] contiguous.
        v (torch.Tensor): [B, Hkv, T, Dv] contiguous.
        plan: shapes, blocks and the padded projection (:class:`_Plan`).

    Returns:
        tuple: o [B, H, T, Dv] (q's dtype), o in fp32, the stabilisers (:func:`_stabilisers`), the states the
        output pass read: S [n, B * Hkv, F_PAD, Dv'] and z [n, B * Hkv, F_PAD] (n = 1 bidirectional, n_split
        causal; padded, fp32), and the normaliser den [B, H, T] (fp32, before the clamp).
    """
    p = plan
    stabs = _stabilisers(q, k, p)
    qs, gmax, rk, mr = stabs
    n_kv = p.B * p.HKV
    s_part = torch.empty(p.n_split, n_kv, p.F_PAD, p.BLOCK_DV, device=q.device, dtype=torch.float32)
    z_part = torch.empty(p.n_split, n_kv, p.F_PAD, device=q.device, dtype=torch.float32)
    _feature_attention_fwd_kernel_state[(p.n_split, n_kv, p.n_fc)](
        k, v, p.w, gmax, rk, mr, s_part, z_part, p.T, p.x_scale, p.inv_sqrt_m, p.cps, RUN_MAX=p.run_max,
        **p.meta()
    )
    if p.run_max:
        s_state = _prefix_rebased(s_part, mr, p).contiguous()
        z_state = _prefix_rebased(z_part, mr, p).contiguous()
    else:
        s_state = _segment_scan(s_part, p.causal, reverse=False).contiguous()
        z_state = _segment_scan(z_part, p.causal, reverse=False).contiguous()
    # per feature chunk: partial numerators and denominators, summed here (deterministic, no atomics)
    num = torch.empty(p.n_fc, p.B, p.H, p.T, p.DV, device=q.device, dtype=torch.float32)
    den = torch.empty(p.n_fc, p.B, p.H, p.T, device=q.device, dtype=torch.float32)
    # bidirectional chunks are independent: one program per chunk
    cps = p.cps if p.causal else 1
    n_prog = p.n_split if p.causal else triton.cdiv(p.T, p.BLOCK_T)
    _feature_attention_fwd_kernel[(n_prog, p.B * p.H, p.n_fc)](
        q, k, v, p.w, qs, gmax, rk, mr, s_state, z_state, num, den,
        p.H, p.HKV, p.T, p.x_scale, p.inv_sqrt_m, cps,
        GROUP=p.H // p.HKV, CAUSAL=p.causal, RUN_MAX=p.run_max, **p.meta(),
    )  # fmt: skip
    num, den = num.sum(0), den.sum(0)
    o32 = num / den.clamp_min(EPS).unsqueeze(-1)
    return o32.to(q.dtype), o32, stabs, s_state, z_state, den


def feature_attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o32: torch.Tensor,
    den: torch.Tensor,
    stabs: tuple[torch.Tensor, ...],
    s_state: torch.Tensor,
    z_state: torch.Tensor,
    plan: _Plan,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (dq, the R/r states, then dk/dv), each per feature chunk.

    Args:
        do (torch.Tensor): [B, H, T, Dv] contiguous upstream gradient.
        q, k, v (torch.Tensor): the contiguous forward inputs.
        o32, den, stabs, s_state, z_state: from :func:`feature_attention_fwd`.
        plan: the forward's :class:`_Plan`.

    Returns:
        tuple: dq [B, H, T, D], dk [B, Hkv, T, D], dv [B, Hkv, T, Dv] in the input dtype.
    """
    p = plan
    qs, gmax, rk, mr = stabs
    n_kv = p.B * p.HKV
    group = p.H // p.HKV
    cps = p.cps if p.causal else 1
    n_prog = p.n_split if p.causal else triton.cdiv(p.T, p.BLOCK_T)
    # g = dO / den and h = -(dO . o) / den; the clamp passes no gradient to den where it is active
    rden = 1.0 / den.clamp_min(EPS)
    hh = torch.where(den >= EPS, -(do.float() * o32).sum(-1) * rden, 0.0).contiguous()
    # per feature chunk: partial gradients (each chunk's share of dx is linear in it), summed here
    dq = torch.empty(p.n_fc, *q.shape, device=q.device, dtype=torch.float32)
    _feature_attention_bwd_kernel_dq[(n_prog, p.B * p.H, p.n_fc)](
        q, k, v, p.w, qs, gmax, rk, mr, s_state, z_state, do, hh, rden, dq,
        p.H, p.HKV, p.T, p.x_scale, p.inv_sqrt_m, cps,
        GROUP=group, CAUSAL=p.causal, RUN_MAX=p.run_max, **p.meta(),
    )  # fmt: skip
    r_part = torch.empty(p.n_split, n_kv, p.F_PAD, p.BLOCK_DV, device=q.device, dtype=torch.float32)
    rz_part = torch.empty(p.n_split, n_kv, p.F_PAD, device=q.device, dtype=torch.float32)
    _feature_attention_bwd_kernel_state[(p.n_split, n_kv, p.n_fc)](
        q, p.w, qs, mr, do, hh, rden, r_part, rz_part, p.H, p.HKV, p.T, p.x_scale, p.inv_sqrt_m, p.cps,
        GROUP=group, RUN_MAX=p.run_max, **p.meta(),
    )  # fmt: skip
    if p.run_max:
        r_state = _suffix_rebased(r_part, mr, p).contiguous()
        rz_state = _suffix_rebased(rz_part, mr, p).contiguous()
    else:
        r_state = _segment_scan(r_part, p.causal, reverse=True).contiguous()
        rz_state = _segment_scan(rz_part, p.causal, reverse=True).contiguous()
    dk = torch.empty(p.n_fc, *k.shape, device=q.device, dtype=torch.float32)
    dv = torch.empty(p.n_fc, *v.shape, device=q.device, dtype=torch.float32)
    _feature_attention_bwd_kernel_dkv[(n_prog, n_kv, p.n_fc)](
        q, k, v, p.w, qs, gmax, rk, mr, r_state, rz_state, do, hh, rden, dk, dv,
        p.H, p.HKV, p.T, p.x_scale, p.inv_sqrt_m, cps,
        GROUP=group, CAUSAL=p.causal, RUN_MAX=p.run_max, **p.meta(),
    )  # fmt: skip
    return dq.sum(0).to(q.dtype), dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)


class FeatureAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o (fp32), den, the stabilisers and the small states; backward recomputes
    the features."""

    @staticmethod
    def forward(ctx, q, k, v, W, causal: bool, feature_map: str, scale: float | None):
        _check_inputs(q, k, v, W, feature_map)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        plan = _Plan(q, k, v, W, causal=causal, feature_map=feature_map, scale=scale)
        o, o32, stabs, s_state, z_state, den = feature_attention_fwd(q, k, v, plan)
        ctx.save_for_backward(q, k, v, o32, den, *stabs, s_state, z_state)
        ctx.plan = plan
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o32, den, qs, gmax, rk, mr, s_state, z_state = ctx.saved_tensors
        dq, dk, dv = feature_attention_bwd(do.contiguous(), q, k, v, o32, den, (qs, gmax, rk, mr), s_state, z_state,
                                           ctx.plan)  # fmt: skip
        return dq, dk, dv, None, None, None, None


def triton_feature_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    W: torch.Tensor,
    *,
    causal: bool,
    feature_map: str = "softmax",
    scale: float | None = None,
    temperature: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Random-feature attention (Triton), linear in T, differentiable in q, k, v, temperature (not W).

    Args:
        q (torch.Tensor): [B, H, T, D].
        k (torch.Tensor): [B, Hkv, T, D]; H % Hkv == 0.
        v (torch.Tensor): [B, Hkv, T, Dv]; Dv may differ from D; head dims <= 256.
        W (torch.Tensor): [D, M] from :func:`~stackwise.kernels.draw_features`, M <= 1024, shared by all heads.
        causal: query i attends to keys j <= i only.
        feature_map: "softmax" (FAVOR+, estimates exp(q.k * scale)) or "trig" (random Fourier features).
        scale: defaults to D ** -0.5.
        temperature: "trig" only: tau, a float or a tensor [] / [Hkv] (per kv head); see
            :func:`~stackwise.kernels.features.reference.trig_normalise`. The normalisation runs in torch
            (autograd gives its gradient, also to tau); the kernels take the normalised x^.

    Returns:
        torch.Tensor: [B, H, T, Dv] in q's dtype.

    Raises:
        ValueError: bad shapes, dtypes or devices (naming the argument), T != S, D or M too large
            (:func:`fits`), a temperature with the "softmax" map.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.

    Examples::

        >>> W = draw_features(64, 128, family="orthogonal", seed=0)
        >>> q = k = v = torch.randn(1, 4, 1024, 64, device="cuda", dtype=torch.bfloat16)
        >>> triton_feature_attention(q, k, v, W, causal=True).shape
        torch.Size([1, 4, 1024, 64])
    """
    if feature_map == "trig":
        _check_inputs(q, k, v, W, feature_map)
        scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
        q = trig_normalise(q.float(), scale=scale, temperature=temperature).to(q.dtype)
        k = trig_normalise(k.float(), scale=scale, temperature=temperature).to(k.dtype)
    elif temperature is not None:
        raise ValueError(f"temperature applies to feature_map='trig' only, got feature_map={feature_map!r}")
    return FeatureAttentionFunction.apply(q, k, v, W, causal, feature_map, scale)
