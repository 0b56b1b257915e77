# SPDX-License-Identifier: MIT
"""Compile every Triton kernel configuration for sm_80 and sm_90 without a GPU: shared memory, registers, tensor cores.

``python benchmarks/kernel_compile_check.py [--quick] [--jobs N] [--filter REGEX] [--json-out FILE]``

Compiles with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` everything the launchers
can pick, from the launchers' own rules (``flash.fwd_configs``, ``flash.bwd_blocks``, ``features.tiles``):

- flash attention: each forward autotune config and the backward (preprocess, dQ, dK/dV) blocks, for fp32 /
  bf16 / fp16 x head dims 64, 128, 192/128 (MLA: Dqk 192, Dv 128), 256 x causal / bidirectional x GQA (8 query
  heads per kv head) / MHA;
- feature attention: all six kernels (the row max for queries and keys) x "softmax" / "trig" x M 64 / 256 x
  head dims 128 / 256 x the three dtypes x causal / bidirectional (GQA 4/1), at the feature-chunk tiles
  ``features.tiles`` picks (sizes it rejects would be listed as "torch path"; there are none);

each for sm_80 and sm_90, with pointers and strides marked 16-divisible as a real launch specialises them.
Prints a table (kernel, config, dtype, arch, shared memory, registers, spilled bytes, tensor-core instruction:
wgmma / mma / wgmma+mma / none) and a final ``JSON {...}`` line. Exits 1 on a compile failure, a block needing
more shared memory than the arch has (sm_80 163 KiB, sm_90 227 KiB), or a bf16/fp16 flash kernel with a matmul
that compiles for sm_90 without ``wgmma``. ``--quick``: the small subset ``make test`` runs. Compiling is not
running: this finds resource and lowering failures and instruction choices, not wrong results or speed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import signal
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ["TRITON_INTERPRET"] = "0"  # before the kernel modules are imported: the real GPU config lists
# a private, empty cache: every compile runs ptxas, whose log gives the register and spill counts
os.environ.setdefault("STACKWISE_COMPILE_CACHE", tempfile.mkdtemp(prefix="sw_compile_check_"))
os.environ["TRITON_CACHE_DIR"] = os.environ["STACKWISE_COMPILE_CACHE"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from stackwise.kernels.features import triton as feat  # noqa: E402
from stackwise.kernels.flash import triton as flash  # noqa: E402

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
FP32_PTR = {"LSE", "DELTA", "W", "QS", "GMAX", "RK", "MR", "S", "Z", "HH", "RDEN", "R", "RZ", "OUT", "PO", "PDEN",
            "PDQ", "PDK", "PDV"}
DATA_PTR = {"Q", "K", "V", "X", "Out", "DO", "DQ", "DK", "DV_"}
FP32_SCALAR = {"sm_scale", "x_scale", "inv_sqrt_m", "eps"}
# flash head-dim classes (Dqk, Dv)
FLASH_DIMS = ((64, 64), (128, 128), (192, 128), (256, 256))
# feature head dims: 128 runs 64-feature chunks, 256 runs 32-feature chunks
FEATURE_DIMS = (128, 256)
KERNELS = {
    "flash_fwd": flash._attention_fwd_kernel,
    "flash_bwd_pre": flash._attention_bwd_kernel_preprocess,
    "flash_bwd_dq": flash._attention_bwd_kernel_dq,
    "flash_bwd_dkv": flash._attention_bwd_kernel_dkv,
    "feat_row_max": feat._feature_row_max_kernel,
    "feat_state": feat._feature_attention_fwd_kernel_state,
    "feat_fwd": feat._feature_attention_fwd_kernel,
    "feat_bwd_dq": feat._feature_attention_bwd_kernel_dq,
    "feat_bwd_state": feat._feature_attention_bwd_kernel_state,
    "feat_bwd_dkv": feat._feature_attention_bwd_kernel_dkv,
}


def _signature(fn, dtype: str) -> tuple[dict[str, str], dict]:
    """Argument types for ``ASTSource`` and the 16-divisibility attributes a real launch would give."""
    sig, attrs = {}, {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            sig[p.name] = "constexpr"
            continue
        if p.name in FP32_PTR:
            sig[p.name] = "*fp32"
        elif p.name in DATA_PTR:
            sig[p.name] = f"*{dtype}"
        elif p.name in FP32_SCALAR:
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
        # torch allocations are 16-byte aligned and every stride is a multiple of the head dim (>= 64)
        if sig[p.name].startswith("*") or p.name.startswith("stride_"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def _case(kernel, tag, dtype, arch, consts, warps, stages):
    return dict(kernel=kernel, tag=tag, dtype=dtype, arch=arch, consts=consts, warps=warps, stages=stages)


def flash_cases(quick: bool) -> list[dict]:
    """Every flash configuration the launchers pick (``fwd_configs`` per target, ``bwd_blocks``)."""
    cases = []
    dims = ((128, 128), (192, 128)) if quick else FLASH_DIMS
    for dqk, dv in dims:
        bdqk, bdv = flash._block_dim(dqk), flash._block_dim(dv)
        for dtype in ("bf16",) if quick else ("fp32", "bf16", "fp16"):
            lowp = dtype != "fp32"
            for causal in (True,) if quick else (True, False):
                for group in (8,) if quick else (8, 1):
                    base = dict(GROUP=group, DQK=dqk, DV=dv, BLOCK_DQK=bdqk, BLOCK_DV=bdv, CAUSAL=causal, LOWP=lowp,
                                PREC="ieee")
                    tag = f"D{dqk}/{dv} {'causal' if causal else 'bidir'} G{group}"
                    for arch in ARCHS:
                        confs = flash.fwd_configs(bdqk, bdv, lowp, arch)
                        if quick:
                            confs = confs[-1:] if dqk == 128 else []
                        for c in confs:
                            cases.append(_case("flash_fwd", tag, dtype, arch, {**base, **c.kwargs}, c.num_warps,
                                               c.num_stages))
                        if quick and dqk == 128:
                            continue
                        blocks = flash.bwd_blocks(bdqk, bdv, arch, lowp)
                        for part in ("dq", "dkv"):
                            bm, bn, w, s = blocks[part]
                            if quick and arch != 90:
                                continue
                            cases.append(_case(f"flash_bwd_{part}", tag, dtype, arch,
                                               {**base, "BLOCK_M": bm, "BLOCK_N": bn}, w, s))
            if not quick:
                # delta = rowsum(dO * O): independent of the mask and the grouping
                for arch in ARCHS:
                    cases.append(_case("flash_bwd_pre", f"D{dqk}/{dv}", dtype, arch,
                                       dict(DV=dv, BLOCK_DV=bdv, BLOCK_M=64), 4, 3))
    return cases


def feature_cases(quick: bool) -> tuple[list[dict], list[dict]]:
    """The six feature-attention kernels at the tiles ``features.tiles`` picks, GQA 4/1.

    Per (map, M, head dim, arch): M 64 and 256 at head dims 128 (64-feature chunks) and 256 (32-feature chunks,
    the largest per-program tiles); sizes ``features.tiles`` rejects are returned as "torch path" rows (none
    since the feature axis is split). The row max runs for "softmax" only, once for queries and once for keys.
    """
    cases, fallbacks = [], []
    for fmap in ("softmax",) if quick else ("softmax", "trig"):
        is_trig = fmap == "trig"
        for m in (256,) if quick else (64, 256):
            for d in (128,) if quick else FEATURE_DIMS:
                for arch in ARCHS if not quick else (90,):
                    t = feat.tiles(d, d, m, is_trig, arch)
                    if t is None:
                        fallbacks.append(dict(kernel="feat_*", tag=f"{fmap} M{m} D{d}", arch=arch))
                        continue
                    warps, stages = t.pop("num_warps"), t.pop("num_stages")
                    for dtype in ("bf16",) if quick else ("fp32", "bf16", "fp16"):
                        prec = "ieee" if dtype == "fp32" else "tf32"
                        meta = dict(D=d, DV=d, M=m, IS_TRIG=is_trig, **t, PREC=prec)
                        if not is_trig and not quick:
                            # independent of the mask and the grouping
                            for is_key in (False, True):
                                cases.append(_case("feat_row_max", f"{fmap} M{m} D{d} {'k' if is_key else 'q'}", dtype,
                                                   arch, dict(D=d, M=m, IS_KEY=is_key, BLOCK_T=t["BLOCK_T"],
                                                              BLOCK_D=t["BLOCK_D"], BLOCK_F=t["BLOCK_F"], PREC=prec),
                                                   warps, stages))
                        for causal in (True,) if quick else (True, False):
                            run_max = causal and not is_trig
                            tag = f"{fmap} M{m} D{d} {'causal' if causal else 'bidir'}"
                            flags = dict(CAUSAL=causal, RUN_MAX=run_max, GROUP=4)
                            cases.append(_case("feat_fwd", tag, dtype, arch, {**meta, **flags}, warps, stages))
                            if quick:
                                continue
                            cases += [
                                _case("feat_state", tag, dtype, arch, {**meta, "RUN_MAX": run_max}, warps, stages),
                                _case("feat_bwd_dq", tag, dtype, arch, {**meta, **flags}, warps, stages),
                                _case("feat_bwd_state", tag, dtype, arch, {**meta, "RUN_MAX": run_max, "GROUP": 4},
                                      warps, stages),
                                _case("feat_bwd_dkv", tag, dtype, arch, {**meta, **flags}, warps, stages),
                            ]
    return cases, fallbacks


def _config_text(case: dict) -> str:
    blocks = ",".join(f"{k[6:]}={v}" for k, v in case["consts"].items()
                      if k.startswith("BLOCK_") and k not in ("BLOCK_D", "BLOCK_DQK", "BLOCK_DV"))
    return f"{case['tag']} {blocks} w{case['warps']} s{case['stages']}"


def compile_case(case: dict) -> dict:
    """Compile one case; the result row (shared bytes, registers, spills, tensor-core instruction, status)."""
    fn = KERNELS[case["kernel"]]
    sig, attrs = _signature(fn, case["dtype"])
    t0 = time.perf_counter()
    log = io.StringIO()
    try:
        import triton.knobs as knobs

        knobs.nvidia.dump_ptxas_log = True
    except (ImportError, AttributeError):  # older Triton: no ptxas log, registers unknown
        pass
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(
                ASTSource(fn=fn, signature=sig, constexprs=case["consts"], attrs=attrs),
                target=GPUTarget("cuda", case["arch"], 32),
                options=dict(num_warps=case["warps"], num_stages=case["stages"]),
            )
    except Exception as e:  # noqa: BLE001 - any lowering error is a result to report
        msg = str(e).strip().splitlines()
        return {"ok": False, "error": f"{type(e).__name__}: {msg[0][:200] if msg else ''}",
                "seconds": round(time.perf_counter() - t0, 2)}
    ptx = k.asm["ptx"]
    wg, mma = "wgmma.mma_async" in ptx, "mma.sync" in ptx
    tc = "wgmma+mma" if wg and mma else "wgmma" if wg else "mma" if mma else "none"
    regs = re.findall(r"Used (\d+) registers", log.getvalue())
    spill = re.findall(r"(\d+) bytes spill stores", log.getvalue())
    return {"ok": True, "shared": int(k.metadata.shared), "regs": int(regs[-1]) if regs else None,
            "spill": int(spill[-1]) if spill else None, "tc": tc, "seconds": round(time.perf_counter() - t0, 2)}


def needs_wgmma(case: dict) -> bool:
    """bf16/fp16 flash kernels with matmuls must use wgmma on sm_90 (the preprocess kernel has none)."""
    return case["arch"] == 90 and case["dtype"] != "fp32" and case["kernel"] in (
        "flash_fwd", "flash_bwd_dq", "flash_bwd_dkv")


def _status(case: dict, r: dict) -> str:
    if not r["ok"]:
        return "FAIL " + r["error"]
    if r["shared"] > SMEM_LIMIT[case["arch"]]:
        return f"SHARED > {SMEM_LIMIT[case['arch']] // 1024} KiB"
    if needs_wgmma(case) and r["tc"] != "wgmma":
        return f"NO WGMMA ({r['tc']})"
    return "ok"


def summarise(rows: list[dict]) -> dict:
    """Counts, the largest shared-memory need per arch, and wgmma coverage of the sm_90 low-precision kernels."""
    out = {"compiles": len(rows), "failed": sum(r["status"] != "ok" for r in rows)}
    for arch in ARCHS:
        mine = [r for r in rows if r["arch"] == f"sm_{arch}" and r.get("shared") is not None]
        if mine:
            top = max(mine, key=lambda r: r["shared"])
            out[f"max_shared_sm_{arch}"] = {"bytes": top["shared"], "kernel": top["kernel"], "config": top["config"]}
            out[f"max_spill_sm_{arch}"] = max((r["spill"] or 0) for r in mine)
    for fam in ("flash", "feat"):
        lowp90 = [r for r in rows if r["arch"] == "sm_90" and r["dtype"] != "fp32" and r["kernel"].startswith(fam)
                  and r["kernel"] != "flash_bwd_pre" and r.get("tc") is not None]
        out[f"{fam}_sm90_lowp_wgmma"] = f"{sum(r['tc'] == 'wgmma' for r in lowp90)}/{len(lowp90)}"
        out[f"{fam}_sm90_lowp_not_wgmma"] = sorted({f"{r['kernel']} {r['config']} -> {r['tc']}" for r in lowp90
                                                    if r["tc"] != "wgmma"})[:40]
    return out


def _report(case: dict, r: dict) -> dict:
    """Print one table line and return the row."""
    status = _status(case, r)
    row = {"kernel": case["kernel"], "config": _config_text(case), "dtype": case["dtype"],
           "arch": f"sm_{case['arch']}", **r, "status": status}
    head = f"{row['kernel']:<15} {row['config']:<52} {row['dtype']:<5} {row['arch']:>5} "
    if r["ok"]:
        spill = "-" if r["spill"] is None else r["spill"]
        print(head + f"{r['shared'] / 1024:>7.1f}Ki {r['regs'] or '-':>4} {spill:>6} {r['tc']:>9}  {status}")
    else:
        print(head + f"{'-':>9} {'-':>4} {'-':>6} {'-':>9}  {status}")
    sys.stdout.flush()
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the small subset make test runs (under a minute)")
    ap.add_argument("--jobs", type=int, default=1, help="compile in N worker processes (default 1)")
    ap.add_argument("--filter", default=None, help="only kernels whose 'kernel config dtype arch' matches this regex")
    ap.add_argument("--json-out", default=None, help="also write the JSON summary and rows to this file")
    ap.add_argument("--max-shared-kib", type=int, default=None,
                    help="lower both archs' shared-memory limit to this many KiB (to test the failure path)")
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.max_shared_kib is not None:
        for arch in SMEM_LIMIT:
            SMEM_LIMIT[arch] = min(SMEM_LIMIT[arch], args.max_shared_kib * 1024)
    fcases, fallbacks = feature_cases(args.quick)
    # backward and feature kernels first, then the forward autotune lists (bf16, fp16, fp32): a long run
    # stopped early has the least-covered kernels done
    rank = {"flash_bwd_dq": 0, "flash_bwd_dkv": 0, "flash_fwd": 2, "flash_bwd_pre": 3}
    cases = sorted(flash_cases(args.quick) + fcases, key=lambda c: (
        rank.get(c["kernel"], 1), ("bf16", "fp16", "fp32").index(c["dtype"]) if c["kernel"] == "flash_fwd" else 0))
    if args.filter:
        pat = re.compile(args.filter)
        cases = [c for c in cases if pat.search(f"{c['kernel']} {_config_text(c)} {c['dtype']} sm_{c['arch']}")]
        fallbacks = [fb for fb in fallbacks if pat.search(f"{fb['kernel']} {fb['tag']} * sm_{fb['arch']}")]
    t0 = time.perf_counter()
    print(f"triton {triton.__version__}; {len(cases)} compiles, {args.jobs} job(s)")
    print(f"{'kernel':<15} {'config':<52} {'dtype':<5} {'arch':>5} {'shared':>9} {'regs':>4} {'spill':>6} "
          f"{'tc':>9}  status")
    if args.jobs == 1:
        results = map(compile_case, cases)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=args.jobs)
        results = pool.map(compile_case, cases, chunksize=2)
    rows: list[dict] = []
    interrupted = False
    # SIGTERM / Ctrl-C: stop, and still print the summary and JSON of the compiles that finished
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        for case, r in zip(cases, results):
            rows.append(_report(case, r))
    except KeyboardInterrupt:
        interrupted = True
        print(f"# interrupted after {len(rows)} of {len(cases)} compiles")
    if pool is not None:
        pool.shutdown(wait=not interrupted, cancel_futures=True)
    for fb in fallbacks:
        print(f"{fb['kernel']:<15} {fb['tag']:<52} {'*':<5} {'sm_' + str(fb['arch']):>5} {'-':>9} {'-':>4} {'-':>6} "
              f"{'-':>9}  torch path (tiles do not fit; not compiled)")
    summary = {"triton": triton.__version__, "quick": args.quick, "jobs": args.jobs, "planned": len(cases),
               "interrupted": interrupted, "seconds": round(time.perf_counter() - t0, 1), **summarise(rows),
               "torch_path": [f"{fb['tag']} sm_{fb['arch']}" for fb in fallbacks]}
    for key, val in summary.items():
        if key not in ("triton", "quick", "jobs", "torch_path", "interrupted"):
            print(f"# {key}: {val}")
    out = {**summary, "rows": rows}
    if args.json_out:
        tmp = args.json_out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(out, f)
        os.replace(tmp, args.json_out)
    print("JSON " + json.dumps(out))
    return 1 if summary["failed"] or interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
