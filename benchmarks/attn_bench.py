# SPDX-License-Identifier: MIT
"""Attention benchmark: forward, backward and forward+backward over T for every attention provider.
Ops (shapes: GPU / CPU, the CPU ones scaled down so the default run takes ~2-3 minutes on 2 cores):
- ``gqa``: softmax attention, 32 query / 8 kv heads, d 128 (CPU: 8 / 2 heads, d 64); ``gqa64``: the same at d 64.
- ``mla``: softmax attention with Dqk 192 / Dv 128 (16 heads; CPU 4); ``sdpa_pad`` is SDPA with V padded to 192.
- ``feature``: random-feature attention ("softmax", M 128 or ``--features``; CPU 64) on the gqa shapes, against
  the exact providers: the speedup over SDPA and the time ratio of the largest T to T/4.

Providers: ``triton`` (GPU only; the CPU interpreter is far too slow), ``sdpa`` (torch), ``sdpa_flash`` (SDPA's
FlashAttention-2 backend only, GPU), ``flash_attn`` (imported lazily, only if installed; GPU), ``reference``
(``attention_ref``, the spec; small T only), ``feature`` (public ``feature_attention``, backend "auto": Triton on
GPU up to head dim 256 and M 1024, else the torch chunked path; the row's ``path`` says which), ``feature_torch``
(GPU: the torch chunked path), ``feature_ref`` (the quadratic spec; small T only).

Every provider is checked once against the reference at T=128 before timing (fla ``verify.py``: a speedup
is never reported on a red gate): ``max|out - ref| <= 3 * max|ref_lowp - ref| + 1e-4`` for the output and
the gradients, ``ref_lowp`` being the reference in the run dtype. A red provider is listed, not timed.

Metrics: time (median; GPU ``triton.testing.do_bench``, CPU the median of repeated ``time.perf_counter``
runs), TFLOP/s from :func:`attn_flops` (softmax providers) or :func:`feature_flops` (feature providers),
peak memory (``torch.cuda.max_memory_allocated``; "n/a" on CPU). Backward times ``o.backward(do)`` after
one forward; forward runs with ``requires_grad`` inputs (a training forward). Output: a table per (op, mode,
mask), one ``JSON {...}`` line per case, and CSVs under ``benchmarks/results/<device>/`` (or ``--out-dir``,
which also collects every row in ``attn_rows.jsonl``); ``--providers`` keeps only the named providers.

Usage::

    python benchmarks/attn_bench.py                                   # CPU: small grid, causal, fp32
    python benchmarks/attn_bench.py --op feature --T 4096 16384 --mask causal bidir   # the CPU target
    python benchmarks/attn_bench.py --device cuda --mode fwdbwd --dtype bf16           # GPU, T 512..32k
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stackwise.kernels import attention, draw_features, feature_attention  # noqa: E402
from stackwise.kernels.features.reference import feature_attention_ref  # noqa: E402
from stackwise.kernels.flash.reference import attention_ref  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {
    "gpu": {"gqa": (32, 8, 128, 128), "gqa64": (32, 8, 64, 64), "mla": (16, 16, 192, 128), "feature": (32, 8, 128, 128)},
    "cpu": {"gqa": (8, 2, 64, 64), "gqa64": (8, 2, 64, 64), "mla": (4, 4, 192, 128), "feature": (8, 2, 64, 64)},
}
N_FEATURES = {"gpu": 128, "cpu": 64}
T_GRID = {"gpu": (512, 1024, 2048, 4096, 8192, 16384, 32768), "cpu": (256, 1024, 4096)}
T_QUICK = {"gpu": (1024, 4096), "cpu": (256, 1024)}
# the quadratic references materialise [B, H, T, T]
REF_MAX_T = {"gpu": 4096, "cpu": 2048}
SOFTMAX_PROVIDERS = ("triton", "sdpa", "sdpa_flash", "sdpa_pad", "flash_attn", "reference")
FEATURE_PROVIDERS = ("feature", "feature_torch", "feature_ref")


def attn_flops(B: int, H: int, T: int, D: int, causal: bool, mode: str, Dv: int | None = None) -> float:
    """Softmax attention FLOPs: 2 matmuls of 2*B*H*T*T*D (4*B*H*T*T*D; 2*B*H*T*T*(Dqk + Dv) when they differ),
    halved for causal, x2.5 for backward, x3.5 for forward + backward (Triton tutorial 06)."""
    Dv = D if Dv is None else Dv
    f = 2.0 * B * H * T * T * (D + Dv) * (0.5 if causal else 1.0)
    return f * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]


def feature_flops(B: int, H: int, T: int, D: int, Dv: int, M: int, causal: bool, mode: str, chunk: int = 64):
    """Random-feature attention FLOPs: features of q and k (2 * 2*T*D*M), state and readout (2 * 2*T*M*(Dv+1)),
    plus the causal intra-chunk term (2*T*chunk*(M + Dv + 1) / 2 on average); x2.5 backward, x3.5 both."""
    f = 2.0 * B * H * T * M * (2 * D + 2 * (Dv + 1))
    if causal:
        f += 2.0 * B * H * T * chunk * (M + Dv + 1) / 2
    return f * {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}[mode]


def _flash_attn_func():
    try:
        from flash_attn import flash_attn_func
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return flash_attn_func


def providers_for(op: str, kind: str) -> list[str]:
    """Providers that can run for ``op`` on ``kind`` ("gpu" | "cpu")."""
    gpu = kind == "gpu"
    flash = gpu and _flash_attn_func() is not None
    if op in ("gqa", "gqa64"):
        names = ["triton"] * gpu + ["sdpa"] + ["sdpa_flash"] * gpu + ["flash_attn"] * flash + ["reference"]
    elif op == "mla":
        names = ["triton"] * gpu + ["sdpa", "sdpa_pad", "reference"]
    elif op == "feature":
        names = ["feature"] + ["feature_torch"] * gpu + ["feature_ref", "sdpa"] + ["sdpa_flash", "triton"] * gpu
        names += ["flash_attn"] * flash
    else:
        raise ValueError(f"--op must be gqa, gqa64, mla or feature, got {op!r}")
    return names


def make_fn(provider: str, q, k, v, W, causal: bool, backend: str):
    """A zero-argument callable computing [B, H, T, Dv] from q, k, v (all providers in the public layout)."""
    group = q.shape[1] // k.shape[1]
    if provider == "triton":
        return lambda: attention(q, k, v, causal=causal, backend="triton")
    if provider == "sdpa":
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)
    if provider == "sdpa_flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def flash():
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=group > 1)

        return flash
    if provider == "sdpa_pad":
        Dv, Dqk = v.shape[-1], q.shape[-1]

        def padded():
            vp = F.pad(v, (0, Dqk - Dv))
            o = F.scaled_dot_product_attention(q, k, vp, is_causal=causal, enable_gqa=group > 1)
            return o[..., :Dv]

        return padded
    if provider == "flash_attn":
        fa = _flash_attn_func()
        # flash-attn uses [B, T, H, D]; convert at its boundary (the transposes are views)
        return lambda: fa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal).transpose(1, 2)
    if provider == "reference":
        return lambda: attention_ref(q, k, v, causal=causal)
    if provider == "feature":
        return lambda: feature_attention(q, k, v, W, causal=causal, backend="auto")
    if provider == "feature_torch":
        return lambda: feature_attention(q, k, v, W, causal=causal, backend="torch")
    if provider == "feature_ref":
        return lambda: feature_attention_ref(q, k, v, W, causal=causal)
    raise ValueError(f"unknown provider {provider!r}")


def _feature_path(provider: str, D: int, Dv: int, M: int, device: torch.device) -> str | None:
    """Which implementation a feature provider runs: "triton", "torch", "reference" (None: softmax providers)."""
    if provider != "feature" or device.type != "cuda":
        return {"feature": "torch", "feature_torch": "torch", "feature_ref": "reference"}.get(provider)
    from stackwise.kernels.features.triton import fits

    return "triton" if fits(D, Dv, M, False, device) else "torch"


def make_inputs(B, H, Hkv, T, D, Dv, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    shapes = ((B, H, T, D), (B, Hkv, T, D), (B, Hkv, T, Dv), (B, H, T, Dv))
    q, k, v, do = (torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), do


def verify(provider, op, shape, M, causal, dtype, device, backend) -> tuple[bool, str]:
    """Gate: output and grads of ``provider`` at T=128 against the reference (see the module docstring)."""
    H, Hkv, D, Dv = shape
    q, k, v, do = make_inputs(1, H, Hkv, 128, D, Dv, dtype, device, seed=1)
    W = draw_features(D, M, family="orthogonal", seed=0, device=device)
    try:
        o = make_fn(provider, q, k, v, W, causal, backend)()
        o.backward(do)
    except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. no flash backend for this shape
        return False, f"error: {type(e).__name__}: {(str(e) or '-').splitlines()[0][:120]}"
    got = [o, q.grad, k.grad, v.grad]
    spec = feature_attention_ref if provider in FEATURE_PROVIDERS else attention_ref
    extra = (W,) if provider in FEATURE_PROVIDERS else ()

    def run_ref(upcast):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        r = spec(*leaves, *extra, causal=causal, upcast=upcast)
        r.backward(do)
        return [r] + [x.grad for x in leaves]

    ref, lowp = run_ref(True), run_ref(False)
    worst = 0.0
    for name, a, r, n in zip(("o", "dq", "dk", "dv"), got, ref, lowp, strict=True):
        err = (a.float() - r.float()).abs().max().item()
        tol = 3 * (n.float() - r.float()).abs().max().item() + 1e-4
        if not err <= tol:
            return False, f"{name} max err {err:.2e} > tol {tol:.2e}"
        worst = max(worst, err / tol)
    return True, f"ok (worst err/tol {worst:.2f})"


def time_ms(fn, grads, kind: str, quick: bool) -> tuple[float, float, float]:
    """(median, p20, p80) in ms."""
    if kind == "gpu":
        import triton.testing

        return tuple(triton.testing.do_bench(fn, grad_to_none=grads, quantiles=[0.5, 0.2, 0.8]))

    def once():
        for x in grads:
            x.grad = None
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    first = once()
    reps = 1 if first > 2000 else max(2 if quick else 3, min(20, int(1000 / max(first, 1e-3))))
    ts = sorted(once() for _ in range(reps))
    return statistics.median(ts), ts[int(0.2 * (len(ts) - 1))], ts[int(0.8 * (len(ts) - 1))]


def bench_case(fn, q, k, v, do, mode, kind, quick):
    grads = [q, k, v]
    if mode == "fwd":
        run = fn
    elif mode == "bwd":
        o = fn()

        def run():
            o.backward(do, retain_graph=True)
    elif mode == "fwdbwd":

        def run():
            fn().backward(do)
    else:
        raise ValueError(f"--mode must be fwd, bwd or fwdbwd, got {mode!r}")
    peak = "n/a"
    if kind == "gpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return (*time_ms(run, grads, kind, quick), peak)


def _commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True)
        return (sha.stdout.strip() or "none") + ("+dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = "not installed"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{os.cpu_count()}core"
    return {"device": name, "torch": torch.__version__, "triton": triton_version, "commit": _commit()}


def write_csv(rows: list[dict], env: dict, op: str, mode: str, dtype: str, out_dir: str | None = None) -> Path:
    slug = "".join(c if c.isalnum() else "_" for c in env["device"]).strip("_").lower()
    path = (Path(out_dir) if out_dir else ROOT / "benchmarks" / "results" / slug) / f"{op}-{mode}-{dtype}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        f.write("".join(f"# {key}: {env[key]}\n" for key in ("device", "torch", "triton", "commit")))
        f.write(f"# date: {datetime.date.today().isoformat()}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def print_table(rows: list[dict], title: str) -> None:
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    print(f"\n{title}")
    print(f"{'T':>7} | " + " | ".join(f"{p:>25}" for p in providers))
    for T in sorted({r["T"] for r in rows}):
        cells = []
        for p in providers:
            r = next((r for r in rows if r["T"] == T and r["provider"] == p), None)
            if r is None or r["ms"] is None:
                cells.append(f"{(r or {}).get('status', '-')[:25]:>25}")
            else:
                cells.append(f"{r['ms']:9.2f} ms {r['tflops']:7.4f} TF/s")
        print(f"{T:>7} | " + " | ".join(cells))


def summarize(rows: list[dict]) -> list[str]:
    """Feature attention: speedup over SDPA at the largest T, and time(T_max) / time(T_max / 4)."""
    lines = []
    for key in sorted({(r["mode"], r["causal"]) for r in rows if r["op"] == "feature"}):
        sel = [r for r in rows if r["op"] == "feature" and (r["mode"], r["causal"]) == key and r["ms"] is not None]
        times = {(r["provider"], r["T"]): r["ms"] for r in sel}
        feat_T = sorted(T for p, T in times if p == "feature")
        if not feat_T:
            continue
        t_max = max(T for T in feat_T if ("sdpa", T) in times) if any(("sdpa", T) in times for T in feat_T) else None
        mask = "causal" if key[1] else "bidir"
        if t_max is not None:
            sdpa_ms, feat_ms = times[("sdpa", t_max)], times[("feature", t_max)]
            lines.append(
                f"feature vs sdpa [{key[0]}, {mask}] at T={t_max}: {sdpa_ms / feat_ms:.2f}x "
                f"(sdpa {sdpa_ms:.1f} ms, feature {feat_ms:.1f} ms)"
            )
        top = feat_T[-1]
        if top // 4 in feat_T:
            ratio = times[("feature", top)] / times[("feature", top // 4)]
            lines.append(f"feature time ratio T{top}/T{top // 4} [{key[0]}, {mask}]: {ratio:.2f} (linear = 4.00)")
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--op", nargs="+", choices=["gqa", "gqa64", "mla", "feature"], default=["gqa", "mla", "feature"])
    ap.add_argument("--mode", nargs="+", choices=["fwd", "bwd", "fwdbwd"], default=["fwd", "bwd", "fwdbwd"])
    ap.add_argument("--dtype", choices=["auto", *DTYPES], default="auto", help="auto: bf16 on cuda, fp32 on cpu")
    ap.add_argument("--mask", nargs="+", choices=["causal", "bidir"], default=None, help="default: causal on cpu")
    ap.add_argument("--T", nargs="+", type=int, default=None, help="sequence lengths (default: per device)")
    ap.add_argument("--quick", action="store_true", help="two sequence lengths, fewer repeats")
    ap.add_argument("--features", type=int, default=None, help="M of the feature op (default: 128 GPU, 64 CPU)")
    ap.add_argument("--providers", nargs="+", default=None, help="only these providers (default: all that run)")
    ap.add_argument("--out-dir", default=None, help="write CSVs here and append rows to OUT_DIR/attn_rows.jsonl")
    args = ap.parse_args(argv)
    bad = args.providers and not set(args.providers) <= set(SOFTMAX_PROVIDERS + FEATURE_PROVIDERS)
    if bad or (args.features is not None and args.features < 1):
        ap.error(f"--features must be >= 1 and --providers among {SOFTMAX_PROVIDERS + FEATURE_PROVIDERS}; got "
                 f"{args.features}, {args.providers}")
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)

    if args.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False; use --device cpu")
    device = torch.device(
        "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    )
    kind = "gpu" if device.type == "cuda" else "cpu"
    dtype_name = args.dtype if args.dtype != "auto" else ("bf16" if kind == "gpu" else "fp32")
    dtype = DTYPES[dtype_name]
    masks = args.mask or (["causal", "bidir"] if kind == "gpu" else ["causal"])
    t_grid = args.T or (T_QUICK if args.quick else T_GRID)[kind]
    backend = "triton" if kind == "gpu" else "torch"
    env = environment(device)
    print(f"# attn_bench on {env['device']} | torch {env['torch']} | triton {env['triton']} | commit {env['commit']}")
    print(f"# dtype {dtype_name}, masks {masks}, T {list(t_grid)}, ops {args.op}, modes {args.mode}")

    all_rows = []
    for op in args.op:
        H, Hkv, D, Dv = SHAPES[kind][op]
        M = args.features or N_FEATURES[kind]
        for mask in masks:
            causal = mask == "causal"
            names = [p for p in providers_for(op, kind) if not args.providers or p in args.providers]
            if not names:
                print(f"# {op}: none of --providers {args.providers} runs on {kind}; skipped")
                continue
            gate = {p: verify(p, op, (H, Hkv, D, Dv), M, causal, dtype, device, backend) for p in names}
            for mode in args.mode:
                rows = []
                for T in t_grid:
                    B = max(1, 16384 // T) if kind == "gpu" else 1
                    for p in names:
                        ok, status = gate[p]
                        row = {"op": op, "mode": mode, "dtype": dtype_name, "causal": causal, "T": T, "B": B, "H": H,
                               "Hkv": Hkv, "D": D, "Dv": Dv, "M": M if p in FEATURE_PROVIDERS else None,
                               "provider": p, "status": status if ok else f"RED: {status}",
                               "ms": None, "ms_p20": None, "ms_p80": None, "tflops": None, "peak_mib": "n/a",
                               "flops_formula": "feature_flops" if p in FEATURE_PROVIDERS else "attn_flops",
                               "path": _feature_path(p, D, Dv, M, device),
                               "device": env["device"]}  # fmt: skip
                        if ok and p in ("reference", "feature_ref") and T > REF_MAX_T[kind]:
                            row["status"] = f"skipped (T > {REF_MAX_T[kind]})"
                        elif ok:
                            q, k, v, do = make_inputs(B, H, Hkv, T, D, Dv, dtype, device)
                            W = draw_features(D, M, family="orthogonal", seed=0, device=device)
                            fn = make_fn(p, q, k, v, W, causal, backend)
                            ms, p20, p80, peak = bench_case(fn, q, k, v, do, mode, kind, args.quick)
                            flops = (
                                feature_flops(B, H, T, D, Dv, M, causal, mode)
                                if p in FEATURE_PROVIDERS
                                else attn_flops(B, H, T, D, causal, mode, Dv)
                            )
                            row.update(ms=round(ms, 3), ms_p20=round(p20, 3), ms_p80=round(p80, 3),
                                       tflops=round(flops / ms / 1e9, 5), peak_mib=peak)  # fmt: skip
                            del q, k, v, do, fn
                        print("JSON " + json.dumps(row), flush=True)
                        if args.out_dir:
                            with open(os.path.join(args.out_dir, "attn_rows.jsonl"), "a") as f:
                                f.write(json.dumps(row) + "\n")
                        rows.append(row)
                print_table(rows, f"{op} {mode} {mask} {dtype_name} (H {H}/{Hkv}, D {D}/{Dv})")
                print(f"# csv: {write_csv(rows, env, op, mode, dtype_name, args.out_dir)}")
                all_rows += rows
    print("".join(f"# {line}\n" for line in summarize(all_rows)), end="")


if __name__ == "__main__":
    main()
