# SPDX-License-Identifier: MIT
"""FlashAttention-2 style softmax attention in Triton: forward and backward, bidirectional and causal.

Layout [B, H, T, D] (q) and [B, Hkv, T, D] (k, v). Query head h reads kv head h // (H // Hkv), so GQA/MQA
never materialise repeated K/V. The value head dim Dv may differ from Dqk (MLA 192 / 128); each is padded
to the next power of two *in registers only* (masked loads), never in memory.

Algorithm (Dao 2023, "FlashAttention-2"; Triton tutorial 06 "Fused Attention"):
- forward: one program per (query block, batch*head); online softmax over key blocks in the exp2 domain,
  fp32 accumulators; saves o and the log-sum-exp (LSE, natural log, fp32 [B, H, T]) only.
- backward: ``delta = rowsum(dO * O)`` (preprocess kernel), then two deterministic kernels that recompute
  P from the LSE: dQ per (query block, head), and dK/dV per (key block, kv head), which loops over the query
  heads of its group and accumulates in registers, so there are no atomics and two backward passes give
  bit-identical gradients.

Precision: loads are upcast to fp32 right after ``tl.load`` (Triton's interpreter returns garbage for bf16
otherwise). Matmul operands go back to the input dtype for bf16/fp16 on GPU (tensor cores, fp32 accumulate),
stay fp32 with ``input_precision="ieee"`` for fp32 inputs (no silent TF32), and stay fp32 for bf16 under the
interpreter, whose bf16 ``tl.dot`` is broken.

Caveats: only self-attention (T == S, causal mask aligned at the start). The GPU autotune list and the
``tl.dot`` shape constraints (every dim >= 16, power-of-two blocks) are respected by construction but were
not exercised on a GPU when this file was written; CI runs the kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._utils import check_attention_inputs, interpreting

# largest supported head dim (Dqk and Dv); the padded tile is at most 256 wide
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


@triton.jit
def _mm(a, b, DT: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr):
    """a @ b with fp32 accumulation; operands cast to ``DT`` when ``LOWP`` (bf16/fp16 tensor cores)."""
    if LOWP:
        return tl.dot(a.to(DT), b.to(DT), out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,
    H, T, sm_scale,
    GROUP: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    DT = Q.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < T
    dk_mask = offs_dk < DQK
    dv_mask = offs_dv < DV

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_dk[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & dk_mask[None, :], other=0.0).to(tl.float32)  # [BLOCK_M, BLOCK_DQK]
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    # scores in the exp2 domain: exp(x * scale) == exp2(x * scale * log2(e))
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        hi = T
    # key 0 is visible to every row (also padded ones), so m_i is finite after the first block
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < T
        kt = tl.load(
            k_base + cols[None, :] * stride_kt + offs_dk[:, None], mask=dk_mask[:, None] & n_mask[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_DQK, BLOCK_N]
        v = tl.load(
            v_base + cols[:, None] * stride_vt + offs_dv[None, :], mask=n_mask[:, None] & dv_mask[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_N, BLOCK_DV]
        s = _mm(q, kt, DT, LOWP, PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        valid = n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])  # [BLOCK_M, BLOCK_N]
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p, v, DT, LOWP, PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    # natural-log LSE: (m + log2 l) * ln 2
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=m_mask[:, None] & dv_mask[None, :])
    tl.store(LSE + pid_bh * T + offs_m, lse, mask=m_mask)


@triton.jit
def _attention_bwd_kernel_preprocess(
    Out, DO, DELTA,
    stride_ob, stride_oh, stride_ot,
    stride_dob, stride_doh, stride_dot,
    H, T,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < T) & (offs_dv[None, :] < DV)
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_dv[None, :], mask=mask, other=0.0
    )
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :], mask=mask, other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # [BLOCK_M]
    tl.store(DELTA + pid_bh * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _attention_bwd_kernel_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, sm_scale,
    GROUP: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    hkv = h // GROUP
    DT = Q.dtype.element_ty
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_mask = offs_m < T
    dk_mask = offs_dk < DQK
    dv_mask = offs_dv < DV

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_dk[None, :],
        mask=m_mask[:, None] & dk_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_M, BLOCK_DQK]
    do = tl.load(
        DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_dv[None, :],
        mask=m_mask[:, None] & dv_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_M, BLOCK_DV]
    lse2 = tl.load(LSE + pid_bh * T + offs_m, mask=m_mask, other=0.0) * 1.4426950408889634  # [BLOCK_M]
    delta = tl.load(DELTA + pid_bh * T + offs_m, mask=m_mask, other=0.0)  # [BLOCK_M]
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    qk_scale = sm_scale * 1.4426950408889634

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((pid_m + 1) * BLOCK_M, T)
    else:
        hi = T
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_mask = cols < T
        k = tl.load(
            k_base + cols[:, None] * stride_kt + offs_dk[None, :], mask=n_mask[:, None] & dk_mask[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_N, BLOCK_DQK]
        vt = tl.load(
            v_base + cols[None, :] * stride_vt + offs_dv[:, None], mask=dv_mask[:, None] & n_mask[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_DV, BLOCK_N]
        s = _mm(q, tl.trans(k), DT, LOWP, PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        valid = m_mask[:, None] & n_mask[None, :]
        if CAUSAL:
            valid = valid & (offs_m[:, None] >= cols[None, :])
        p = tl.where(valid, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _mm(do, vt, DT, LOWP, PREC)  # [BLOCK_M, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += _mm(ds, k, DT, LOWP, PREC)
    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_dk[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=m_mask[:, None] & dk_mask[None, :],
    )


@triton.jit
def _attention_bwd_kernel_dkv(
    Q, K, V, DO, LSE, DELTA, DK, DV_,
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    H, HKV, T, sm_scale,
    GROUP: tl.constexpr, DQK: tl.constexpr, DV: tl.constexpr,
    BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, LOWP: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0).to(tl.int64)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    hkv = pid_bh % HKV
    DT = Q.dtype.element_ty
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_dk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_mask = offs_n < T
    dk_mask = offs_dk < DQK
    dv_mask = offs_dv < DV

    k = tl.load(
        K + b * stride_kb + hkv * stride_kh + offs_n[:, None] * stride_kt + offs_dk[None, :],
        mask=n_mask[:, None] & dk_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_N, BLOCK_DQK]
    v = tl.load(
        V + b * stride_vb + hkv * stride_vh + offs_n[:, None] * stride_vt + offs_dv[None, :],
        mask=n_mask[:, None] & dv_mask[None, :],
        other=0.0,
    ).to(tl.float32)  # [BLOCK_N, BLOCK_DV]
    qk_scale = sm_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # causal: query blocks that end before this key block see none of it
    if CAUSAL:
        lo = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M
    else:
        lo = 0
    # the group's query heads in a fixed order: the accumulation is deterministic (no atomics)
    for g in range(GROUP):
        h = hkv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        row_base = (b * H + h) * T
        for start_m in range(lo, T, BLOCK_M):
            rows = start_m + offs_m
            m_mask = rows < T
            qt = tl.load(
                q_base + rows[None, :] * stride_qt + offs_dk[:, None],
                mask=dk_mask[:, None] & m_mask[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_DQK, BLOCK_M]
            do = tl.load(
                do_base + rows[:, None] * stride_dot + offs_dv[None, :],
                mask=m_mask[:, None] & dv_mask[None, :],
                other=0.0,
            ).to(tl.float32)  # [BLOCK_M, BLOCK_DV]
            lse2 = tl.load(LSE + row_base + rows, mask=m_mask, other=0.0) * 1.4426950408889634  # [BLOCK_M]
            delta = tl.load(DELTA + row_base + rows, mask=m_mask, other=0.0)  # [BLOCK_M]
            st = _mm(k, qt, DT, LOWP, PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
            valid = n_mask[:, None] & m_mask[None, :]
            if CAUSAL:
                valid = valid & (rows[None, :] >= offs_n[:, None])
            pt = tl.where(valid, tl.exp2(st - lse2[None, :]), 0.0)  # [BLOCK_N, BLOCK_M]
            dv += _mm(pt, do, DT, LOWP, PREC)
            dpt = _mm(v, tl.trans(do), DT, LOWP, PREC)  # [BLOCK_N, BLOCK_M]
            dst = pt * (dpt - delta[None, :])
            dk += _mm(dst, tl.trans(qt), DT, LOWP, PREC)
    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + hkv * stride_dkh + offs_n[:, None] * stride_dkt + offs_dk[None, :],
        dk.to(DK.dtype.element_ty),
        mask=n_mask[:, None] & dk_mask[None, :],
    )
    tl.store(
        DV_ + b * stride_dvb + hkv * stride_dvh + offs_n[:, None] * stride_dvt + offs_dv[None, :],
        dv.to(DV_.dtype.element_ty),
        mask=n_mask[:, None] & dv_mask[None, :],
    )


# per-block shared memory (bytes) by target, when the device does not report it (sm_86/89/120 have 99 KiB)
SMEM_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}
# room left in the estimate below for the layout-conversion scratch Triton adds beside the pipelined tiles
SMEM_MARGIN = 32 * 1024

# the full GPU forward list; fwd_configs() keeps the ones that fit a given head dim, dtype and target
_FWD_ALL = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
    for bm in (64, 128)
    for bn in (32, 64)
    for w in (4, 8)
    for s in (2, 3)
    if not (bm == 128 and w < 8)  # a 128-row query block needs 8 warps to hold its tiles in registers
]
# the interpreter gets one config (autotune with several fails there)
_FWD_INTERPRET = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4)]
FWD_CONFIGS = _FWD_INTERPRET if interpreting() else _FWD_ALL


def smem_limit(arch: int) -> int:
    """Shared memory per block (bytes) on sm_<arch>; 99 KiB for targets not in the table."""
    return SMEM_PER_BLOCK.get(arch, 99 * 1024)


def fwd_configs(block_dqk: int, block_dv: int, lowp: bool, arch: int, smem: int | None = None) -> list:
    """The forward configs the launcher may autotune over for these padded head dims, dtype and target.

    Rules (checked by benchmarks/kernel_compile_check.py, which compiles every config this returns):
    head dims padded past 128 use 32-key blocks (the q tile plus a k tile stay in registers); fp32 inputs
    (``lowp`` False: 4-byte tiles, no tensor cores) use 64-row query blocks and 8 warps only (at 4 warps a
    64 x 64 fp32 forward spilled 17 KiB per thread on sm_80, and fp32 is a correctness path, not a
    speed one); and the pipelined k/v tiles, ``num_stages * BLOCK_N * (BLOCK_DQK + BLOCK_DV) * bytes``, leave
    ``SMEM_MARGIN`` of the block's shared memory (``smem``, default :func:`smem_limit`) free.
    """
    if interpreting():
        return list(_FWD_INTERPRET)
    smem = smem_limit(arch) if smem is None else smem
    wide = max(block_dqk, block_dv) > 128
    elt = 2 if lowp else 4
    kept = []
    for c in _FWD_ALL:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if wide and bn > 32:
            continue
        if not lowp and (bm > 64 or c.num_warps < 8):
            continue
        if c.num_stages * bn * (block_dqk + block_dv) * elt + SMEM_MARGIN > smem:
            continue
        kept.append(c)
    return kept


def device_arch(device: torch.device) -> int:
    """Compute capability of a CUDA device as an int (sm_90 -> 90)."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def device_smem(device: torch.device) -> int:
    """Opt-in shared memory per block of a CUDA device (bytes); the table value on torch builds without it."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or smem_limit(device_arch(device)))


def _prune_fwd(configs, named_args, **kwargs):
    """Autotune pruner: :func:`fwd_configs` for the current CUDA device; the interpreter's single config when
    ``TRITON_INTERPRET=1`` (decided per call: the variable may be set after this module was imported, as when
    pytest collects tests/gpu before tests/kernels/conftest.py sets it)."""
    if interpreting():
        one = _FWD_INTERPRET[0]
        same = [c for c in configs if c.kwargs == one.kwargs and c.num_warps == one.num_warps]
        return same[:1] or configs[:1]
    dev = torch.device("cuda", torch.cuda.current_device())
    keep = fwd_configs(kwargs["BLOCK_DQK"], kwargs["BLOCK_DV"], kwargs["LOWP"], device_arch(dev), device_smem(dev))
    names = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in keep}
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in names]


_attention_fwd_tuned = triton.autotune(
    configs=FWD_CONFIGS,
    key=["T", "DQK", "DV", "GROUP", "CAUSAL", "LOWP"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_attention_fwd_kernel)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate the flash kernels' inputs: the public checks plus what these kernels need.

    Raises:
        ValueError: bad shapes/dtypes/devices (naming the argument), T != S, a head dim over 256, or a
            last-dim stride other than 1.
        RuntimeError: tensors on CPU without ``TRITON_INTERPRET=1``.
    """
    check_attention_inputs(q, k, v)
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            f"flash_attention runs on CUDA tensors (or CPU under TRITON_INTERPRET=1), got q on {q.device}; "
            "use stackwise.kernels.attention(..., backend='torch')"
        )
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"flash_attention needs T == S, got q length {q.shape[2]} and k length {k.shape[2]}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.shape[-1] > MAX_HEAD_DIM:
            raise ValueError(f"{name} head dim must be <= {MAX_HEAD_DIM}, got {x.shape[-1]}; split the heads")
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got stride {x.stride(-1)}")


def _block_dim(d: int) -> int:
    """Head dim padded to a power of two >= 16 (``tl.dot`` needs every dim >= 16)."""
    return max(16, triton.next_power_of_2(d))


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(LOWP, PREC): low-precision operands on GPU for bf16/fp16; exact fp32 otherwise."""
    lowp = dtype in (torch.bfloat16, torch.float16) and not (interpreting() and dtype == torch.bfloat16)
    return lowp, "ieee"


def bwd_blocks(block_dqk: int, block_dv: int, arch: int, lowp: bool = True) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the dQ and dK/dV kernels on sm_<arch>.

    Each kernel puts 64 rows on the output side of its matmuls (dQ: 64 query rows against 32-key blocks;
    dK/dV: 64 key rows against 32-query blocks), the row count Hopper's ``wgmma`` needs, with 8 warps: at
    every head dim this spills least among the tiles tried (registers and spills are in the compile
    check's table). On sm_8x (``mma.sync``, no such row minimum) and for fp32 (``lowp`` False: no tensor
    cores; 64-row fp32 tiles at head dim 256 spilled 24-36 KiB per thread on sm_90) head dims padded past 128
    keep 32 x 32.
    """
    if interpreting():
        return {"dq": (64, 32, 4, 2), "dkv": (32, 64, 4, 2)}
    if (arch < 90 or not lowp) and max(block_dqk, block_dv) > 128:
        return {"dq": (32, 32, 8, 2), "dkv": (32, 32, 8, 2)}
    return {"dq": (64, 32, 8, 2), "dkv": (32, 64, 8, 2)}


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel.

    Args:
        q (torch.Tensor): [B, H, T, Dqk], last dim contiguous.
        k (torch.Tensor): [B, Hkv, T, Dqk].
        v (torch.Tensor): [B, Hkv, T, Dv].
        causal: mask future keys.
        scale: defaults to Dqk ** -0.5.

    Returns:
        tuple: o [B, H, T, Dv] in q's dtype, lse [B, H, T] float32 (natural log).
    """
    _check_inputs(q, k, v)
    B, H, T, DQK = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    scale = DQK**-0.5 if scale is None else float(scale)
    o = torch.empty(B, H, T, DV, device=q.device, dtype=q.dtype)
    lse = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    lowp, prec = _dot_flags(q.dtype)

    def grid(meta):
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    _attention_fwd_tuned[grid](
        q, k, v, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T, scale,
        GROUP=H // HKV, DQK=DQK, DV=DV, BLOCK_DQK=_block_dim(DQK), BLOCK_DV=_block_dim(DV),
        CAUSAL=bool(causal), LOWP=lowp, PREC=prec,
    )  # fmt: skip
    return o, lse


def attention_bwd(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    lse: torch.Tensor,
    *,
    causal: bool,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward kernels (preprocess delta, dQ, then dK/dV per kv head).

    Args:
        do (torch.Tensor): [B, H, T, Dv] upstream gradient, last dim contiguous.
        q, k, v (torch.Tensor): the forward inputs.
        o (torch.Tensor): [B, H, T, Dv] forward output.
        lse (torch.Tensor): [B, H, T] float32 from :func:`attention_fwd`.
        causal, scale: as in the forward.

    Returns:
        tuple: dq [B, H, T, Dqk], dk [B, Hkv, T, Dqk], dv [B, Hkv, T, Dv], dtypes of q, k, v.
    """
    _check_inputs(q, k, v)
    B, H, T, DQK = q.shape
    HKV, DV = k.shape[1], v.shape[-1]
    if do.shape != o.shape or do.stride(-1) != 1:
        raise ValueError(f"do must have the output's shape {tuple(o.shape)} and stride 1 in its last dim")
    scale = DQK**-0.5 if scale is None else float(scale)
    block_dqk, block_dv = _block_dim(DQK), _block_dim(DV)
    lowp, prec = _dot_flags(q.dtype)
    blocks = bwd_blocks(block_dqk, block_dv, device_arch(q.device) if q.device.type == "cuda" else 90, lowp)
    delta = torch.empty(B, H, T, device=q.device, dtype=torch.float32)
    _attention_bwd_kernel_preprocess[(triton.cdiv(T, 64), B * H)](
        o, do, delta, *o.stride()[:3], *do.stride()[:3], H, T, DV=DV, BLOCK_DV=block_dv, BLOCK_M=64
    )
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(
        GROUP=H // HKV, DQK=DQK, DV=DV, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        CAUSAL=bool(causal), LOWP=lowp, PREC=prec,
    )  # fmt: skip
    bm, bn, warps, stages = blocks["dq"]
    _attention_bwd_kernel_dq[(triton.cdiv(T, bm), B * H)](
        q, k, v, do, lse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        H, T, scale, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    bm, bn, warps, stages = blocks["dkv"]
    _attention_bwd_kernel_dkv[(triton.cdiv(T, bn), B * HKV)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, HKV, T, scale, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **common,
    )  # fmt: skip
    return dq, dk, dv


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def ensure_last_dim_contiguous(fn):
    """Decorator (Liger ``@ensure_contiguous``): tensor arguments get stride 1 in their last dim."""

    @functools.wraps(fn)
    def wrapper(ctx, *args, **kwargs):
        args = [_last_dim_contiguous(a) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {n: _last_dim_contiguous(a) if isinstance(a, torch.Tensor) else a for n, a in kwargs.items()}
        return fn(ctx, *args, **kwargs)

    return wrapper


class AttentionFunction(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, o and the LSE; backward recomputes P."""

    @staticmethod
    @ensure_last_dim_contiguous
    def forward(ctx, q, k, v, causal: bool, scale: float | None):
        o, lse = attention_fwd(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    @ensure_last_dim_contiguous
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = attention_bwd(do, q, k, v, o, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None
) -> torch.Tensor:
    """FlashAttention-2 style softmax attention (Triton), differentiable in q, k, v.

    Args:
        q (torch.Tensor): [B, H, T, Dqk]; any strides (the last dim is made contiguous).
        k (torch.Tensor): [B, Hkv, T, Dqk]; H % Hkv == 0 (GQA / MQA without repeating K/V).
        v (torch.Tensor): [B, Hkv, T, Dv]; Dv may differ from Dqk (MLA 192 / 128); head dims <= 256.
        causal: query i attends to keys j <= i.
        scale: score scale; defaults to Dqk ** -0.5.

    Returns:
        torch.Tensor: [B, H, T, Dv] in q's dtype (fp32 accumulation inside).

    Raises:
        ValueError: bad shapes, dtypes or devices (naming the argument), T != S, head dim > 256.
        RuntimeError: CPU tensors without ``TRITON_INTERPRET=1``.

    Examples::

        >>> q = torch.randn(2, 8, 128, 192, device="cuda", dtype=torch.bfloat16)
        >>> k = torch.randn(2, 2, 128, 192, device="cuda", dtype=torch.bfloat16)
        >>> v = torch.randn(2, 2, 128, 128, device="cuda", dtype=torch.bfloat16)
        >>> flash_attention(q, k, v, causal=True).shape
        torch.Size([2, 8, 128, 128])
    """
    return AttentionFunction.apply(q, k, v, causal, scale)
