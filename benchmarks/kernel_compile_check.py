# SPDX-License-Identifier: MIT
"""Compile the Triton kernels for sm_80 and sm_90 without a GPU: shared memory and tensor-core use per config.

``python benchmarks/kernel_compile_check.py [--quick]``: for each kernel and launch config (the flash forward
autotune list, the flash backward blocks, and the causal/bidirectional feature-attention kernels), compiles
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for arch 80 and 90, and prints a
table (kernel, config, arch, shared memory, whether the PTX has ``wgmma`` / ``mma``) and a final ``JSON {...}``
line. Exits 1 on a compile failure or a block needing more shared memory than the arch has (sm_80 163 KiB,
sm_90 227 KiB). ``--quick``: four compiles (flash forward on both archs, flash dk/dv and causal feature
forward on sm_90). Compiling is not running: this finds resource and lowering failures, not wrong results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"  # before the kernel modules are imported: the real GPU config lists

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from stackwise.kernels.features import triton as feat  # noqa: E402
from stackwise.kernels.flash import triton as flash  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
FP32_PTR = {"LSE", "DELTA", "W", "GMAX", "RK", "MR", "S", "Z", "HH", "RDEN", "R", "RZ", "PMAX"}
DATA_PTR = {"Q", "K", "V", "Out", "DO", "DQ", "DK", "DV_"}
FP32_SCALAR = {"sm_scale", "x_scale", "inv_sqrt_m", "eps"}


def _signature(fn, dtype: str) -> dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name in FP32_PTR:
            sig[p.name] = "*fp32"
        elif p.name in DATA_PTR:
            sig[p.name] = f"*{dtype}"
        elif p.name in FP32_SCALAR:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


def _flash_cases(quick: bool) -> list[tuple]:
    """(name, fn, constexprs, num_warps, num_stages, archs) for bf16 flash attention, causal, GQA 8/1."""
    cases = []
    for d in (128,) if quick else (64, 128, 256):
        base = dict(GROUP=8, DQK=d, DV=d, BLOCK_DQK=d, BLOCK_DV=d, CAUSAL=True, LOWP=True, PREC="ieee")
        confs = flash.FWD_CONFIGS
        confs = flash._prune_wide(confs, None, BLOCK_DQK=d, BLOCK_DV=d)
        if quick:
            confs = [c for c in confs if c.kwargs == {"BLOCK_M": 128, "BLOCK_N": 64} and c.num_warps == 8
                     and c.num_stages == 3]
        for c in confs:
            cases.append((f"flash_fwd D{d}", flash._attention_fwd_kernel, {**base, **c.kwargs}, c.num_warps,
                          c.num_stages, (80, 90)))
        bm, bn, w = flash._bwd_blocks(d, d)
        bwd = {**base, "BLOCK_M": bm, "BLOCK_N": bn}
        if not quick:
            cases.append((f"flash_bwd_pre D{d}", flash._attention_bwd_kernel_preprocess,
                          dict(DV=d, BLOCK_DV=d, BLOCK_M=64), 4, 3, (80, 90)))
            cases.append((f"flash_bwd_dq D{d}", flash._attention_bwd_kernel_dq, bwd, w, 3, (80, 90)))
        cases.append((f"flash_bwd_dkv D{d}", flash._attention_bwd_kernel_dkv, bwd, w, 3, (90,) if quick else (80, 90)))
    return cases


def _feature_cases(quick: bool) -> list[tuple]:
    """The feature-attention kernels (bf16, GQA 4/1, "softmax" features, D = Dv = M as in _Plan)."""
    cases = []
    for d, m in ((64, 64),) if quick else ((64, 64), (128, 128)):
        bf = max(16, triton.next_power_of_2(m))
        meta = dict(D=d, DV=d, M=m, IS_TRIG=False, BLOCK_T=64 if bf * d <= 128 * 128 else 32, BLOCK_D=d,
                    BLOCK_DV=d, BLOCK_F=bf, PREC="tf32")
        w = 4 if bf * d <= 64 * 64 else 8
        for causal in (True,) if quick else (True, False):
            flags = dict(CAUSAL=causal, RUN_MAX=causal)
            tag = f"D{d} M{m} {'causal' if causal else 'bidir'}"
            cases.append((f"feat_fwd {tag}", feat._feature_attention_fwd_kernel, {**meta, **flags, "GROUP": 4}, w, 3,
                          (90,) if quick else (80, 90)))
            if quick:
                continue
            cases += [
                (f"feat_state {tag}", feat._feature_attention_fwd_kernel_state, {**meta, "RUN_MAX": causal}, w, 3,
                 (80, 90)),
                (f"feat_bwd_dq {tag}", feat._feature_attention_bwd_kernel_dq, {**meta, **flags, "GROUP": 4}, w, 3,
                 (80, 90)),
                (f"feat_bwd_state {tag}", feat._feature_attention_bwd_kernel_state,
                 {**meta, "RUN_MAX": causal, "GROUP": 4}, w, 3, (80, 90)),
                (f"feat_bwd_dkv {tag}", feat._feature_attention_bwd_kernel_dkv, {**meta, **flags, "GROUP": 4}, w, 3,
                 (80, 90)),
            ]
    return cases


def _compile(fn, consts: dict, warps: int, stages: int, arch: int) -> dict:
    t0 = time.perf_counter()
    try:
        k = triton.compile(
            ASTSource(fn=fn, signature=_signature(fn, "bf16"), constexprs=consts),
            target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages),
        )
    except Exception as e:  # noqa: BLE001 - any lowering error is a result to report
        return {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}",
                "seconds": round(time.perf_counter() - t0, 2)}
    ptx = k.asm["ptx"]
    shared = int(k.metadata.shared)
    return {"ok": shared <= SMEM_LIMIT[arch], "shared": shared, "wgmma": "wgmma" in ptx,
            "mma": "mma.sync" in ptx or "wgmma" in ptx, "seconds": round(time.perf_counter() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="four compiles instead of the full list")
    ap.add_argument("--max-shared-kib", type=int, default=None,
                    help="lower both archs' shared-memory limit to this many KiB (to test the failure path)")
    args = ap.parse_args()
    if args.max_shared_kib is not None:
        for arch in SMEM_LIMIT:
            SMEM_LIMIT[arch] = min(SMEM_LIMIT[arch], args.max_shared_kib * 1024)
    rows = []
    cases = _flash_cases(args.quick) + _feature_cases(args.quick)
    print(f"triton {triton.__version__}; {sum(len(c[-1]) for c in cases)} compiles")
    print(f"{'kernel':<28} {'config':<44} {'arch':>5} {'shared':>9} {'wgmma':>6} {'mma':>4}  status")
    for name, fn, consts, warps, stages, archs in cases:
        blocks = ",".join(f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in consts.items()
                          if k.startswith("BLOCK_") and k not in ("BLOCK_D", "BLOCK_DQK", "BLOCK_DV"))
        config = f"{blocks} w{warps} s{stages}"
        for arch in archs:
            r = _compile(fn, consts, warps, stages, arch)
            rows.append({"kernel": name, "config": config, "arch": f"sm_{arch}", **r})
            if "shared" in r:
                status = "ok" if r["ok"] else f"SHARED > {SMEM_LIMIT[arch] // 1024} KiB"
                print(f"{name:<28} {config:<44} {'sm_' + str(arch):>5} {r['shared'] / 1024:>7.1f}Ki "
                      f"{'yes' if r['wgmma'] else 'no':>6} {'yes' if r['mma'] else 'no':>4}  {status}")
            else:
                print(f"{name:<28} {config:<44} {'sm_' + str(arch):>5} {'-':>9} {'-':>6} {'-':>4}  FAIL {r['error']}")
            sys.stdout.flush()
    failed = [r for r in rows if not r["ok"]]
    print("JSON " + json.dumps({"triton": triton.__version__, "quick": args.quick, "compiles": len(rows),
                               "failed": len(failed), "rows": rows}))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
