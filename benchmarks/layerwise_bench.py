# SPDX-License-Identifier: MIT
"""Layer-wise vs end-to-end: peak memory and tokens/s, each beside the planner's prediction.

Cases (each in a FRESH subprocess, so peak RSS belongs to that case alone):
- ``stage``: cached-activation-like h [B, T, C] -> layer k -> head -> masked loss (diffusion views), AdamW on
  layer k + head: the engine's own step (``stackwise.engine.loop.train_step`` on the single backend), so
  ``--train.dtype=bfloat16`` and ``--engine.activation_checkpointing=true`` are measured as a stage runs them.
- ``cache``: caching layer k's outputs (forward only, no grad).
- ``e2e``: end-to-end training of the same model (embeddings, all layers, head), gate/up frozen as in the model.
- ``io``: activation shards written by the store, read back unverified (np.load), through the store's verified
  read (BLAKE3 per block as read: ``ratio_verified_to_disk``) and the old way (whole-file SHA-256, then np.load),
  against the disk's sequential read of one big file; page cache dropped before each read when possible.

Memory: on CPU, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the worker after the work; the baseline
RSS after imports and after a warm-up step of a tiny model of the same kind (which pages in ~70 MB of
library code) are reported, and the planner is compared with peak - baseline (after warm-up). On CUDA,
``torch.cuda.max_memory_allocated``. Usage::

    python benchmarks/layerwise_bench.py                      # scaled tiny config on CPU, all cases
    python benchmarks/layerwise_bench.py --shape 70b-layer    # one 70B-shaped layer, vocab 256, fp32
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_OVERRIDES = ["--model.vocab_size=8192", "--model.d_model=768", "--model.n_layers=4", "--model.n_heads=12",
                     "--model.n_kv_heads=4", "--model.d_ff=2048", "--model.max_seq_len=512", "--data.seq_len=256",
                     "--train.batch_size=4", "--model.attention.backend=torch"]
SHAPE_70B = ["--model.vocab_size=256", "--model.d_model=8192", "--model.n_layers=2", "--model.n_heads=64",
             "--model.n_kv_heads=8", "--model.d_ff=28672", "--model.max_seq_len=64", "--data.seq_len=32",
             "--train.batch_size=1", "--model.attention.attention_type=gqa", "--model.attention.backend=torch"]


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _cur_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _make_step(case: str, cfg, dev, gen):
    """Build the model, data and backend of ``case``; return its step function (one training/caching step).

    Training cases run the engine's own step (:func:`stackwise.engine.loop.train_step` on the single backend, with
    ``train.dtype`` autocast and ``engine.activation_checkpointing``), so what is measured is what a stage runs.
    """
    import torch

    from stackwise.engine.backends import StageModule, create_backend
    from stackwise.engine.distributed import DistEnv
    from stackwise.engine.loop import train_step
    from stackwise.engine.stage_model import all_trainable, trainable_params
    from stackwise.model import StackWiseLM
    from stackwise.objective import Objective

    m, B, T = cfg.model, cfg.train.batch_size, cfg.data.seq_len
    k = min(1, m.n_layers - 1)
    model = StackWiseLM(m, layers=None if case == "e2e" else [k])
    objective = Objective.from_config(cfg.objective, m, "diffusion")
    views = objective.mask(torch.randint(0, m.vocab_size - 1, (B, T), generator=gen), gen)
    # two cached-activation batches: the one in use and the prefetched one (the store's double buffer)
    shards = [torch.randn(B, T, m.d_model, generator=gen).to(dev) for _ in range(2)]
    if case == "cache":
        model = model.to(dev).eval()

        def step(i):
            with torch.no_grad():
                return model.run_layers(shards[i % 2], k, k + 1).to(torch.float32)

        return step
    layers = list(range(m.n_layers)) if case == "e2e" else [k]
    trainable = all_trainable(model) if case == "e2e" else trainable_params(model, [k], cfg)
    backend = create_backend("single", cfg.train, cfg.engine, DistEnv(device=dev), os.devnull)
    backend.build(StageModule(model, layers, objective, cfg.engine.activation_checkpointing), trainable)

    def step(i):
        batch = dict(views, x=shards[i % 2]) if case == "stage" else views
        return train_step(backend, [batch], objective, 1)[0]

    return step


def _worker(case: str, cfg_path: str, overrides: list[str], steps: int, device: str) -> dict:
    import gc

    import torch

    from stackwise.config import load_config

    torch.manual_seed(0)
    cfg = load_config(cfg_path, overrides)
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    after_imports = _cur_rss()
    # warm-up on a tiny model of the same kind: pages in the library code (~70 MB of libtorch text on the first
    # attention call) and starts thread pools, so the baseline holds everything but this case's tensors
    tiny = load_config(cfg_path, overrides + ["--model.d_model=64", "--model.n_heads=4", "--model.n_kv_heads=2",
                                              "--model.d_ff=128", "--model.vocab_size=64", "--train.batch_size=1",
                                              "--data.seq_len=16", "--model.attention.mla_rq=32",
                                              "--model.attention.mla_rkv=16", "--model.attention.qk_nope_head_dim=16",
                                              "--model.attention.qk_rope_head_dim=8",
                                              "--model.attention.v_head_dim=16"])
    warm = _make_step(case, tiny, dev, torch.Generator().manual_seed(0))
    for i in range(2):
        warm(i)
    del warm
    gc.collect()
    base = _cur_rss()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    step = _make_step(case, cfg, dev, gen)
    step(0)  # allocates the optimizer state
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        out = step(i + 1)
    float(out.sum())
    dt = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _rss()
    B, T = cfg.train.batch_size, cfg.data.seq_len
    return {"case": case, "rss_after_imports": after_imports, "baseline": base, "peak": peak,
            "measured": peak - base, "step_s": dt, "tokens_per_s": B * T / dt, "B": B, "T": T,
            "threads": torch.get_num_threads()}


def _drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _io_case(total_mb: int, shard_mb: int, repeats: int = 3) -> dict:
    """Shards written by the store (ShardWriter, BLAKE3), then read: raw, verified by the store, and the old way."""
    import hashlib

    import numpy as np

    from stackwise.data.activations import ShardWriter, load_shard, write_hash

    with tempfile.TemporaryDirectory(dir=os.environ.get("STACKWISE_BENCH_DIR", ROOT)) as d:
        n = max(1, total_mb // shard_mb)
        rows = shard_mb * 2**20 // (4 * 1024)
        store = os.path.join(d, "layer")
        writer = ShardWriter(store, "layer")
        for i in range(n):
            writer.add({"h": np.random.default_rng(i).random((rows, 1024), np.float32)})
        manifest = writer.close({"dtype": "float32"})
        files = [os.path.join(store, s["files"]["h"]["file"]) for s in manifest["shards"]]
        with open(os.path.join(d, "big.bin"), "wb") as f:
            chunk = os.urandom(16 * 2**20)
            for _ in range(n * shard_mb // 16):
                f.write(chunk)
        nbytes = sum(os.path.getsize(p) for p in files)
        out = {"case": "io", "bytes": nbytes, "shards": n, "shard_MB": shard_mb, "hash": write_hash(),
               "repeats": repeats}

        def big():
            buf = bytearray(16 * 2**20)
            with open(os.path.join(d, "big.bin"), "rb", buffering=0) as f:
                return sum(iter(lambda: f.readinto(buf), 0))

        def shards():  # np.load, no verification
            return sum(np.load(p).nbytes for p in files)

        def raw_same_io():  # the store's I/O (WILLNEED, 4 MiB blocks into one buffer) without hashing or parsing
            total = 0
            for p in files:
                with open(p, "rb", buffering=0) as f:
                    size = os.fstat(f.fileno()).st_size
                    os.posix_fadvise(f.fileno(), 0, size, os.POSIX_FADV_WILLNEED)
                    view, got = memoryview(np.empty(size, np.uint8)), 0
                    while got < size and (n := f.readinto(view[got:got + (4 << 20)])):
                        got += n
                total += got
            return total

        def verified():  # the store's read path: block-wise BLAKE3 as read, parsed in place
            return sum(load_shard(store, manifest, i)["h"].nbytes for i in range(n))

        def sha256_old():  # the store before: read all, SHA-256 in one pass, np.load copies
            total = 0
            for p in files:
                with open(p, "rb") as f:
                    raw = f.read()
                hashlib.sha256(raw).hexdigest()
                total += np.load(__import__("io").BytesIO(raw)).nbytes
            return total

        # every read starts from a dropped page cache; the cases alternate and the median of `repeats` counts
        cases = {"disk_seq": big, "shards": shards, "shards_raw": raw_same_io, "shards_verified": verified,
                 "shards_sha256": sha256_old}
        # CPU seconds per GiB (this process, user + system) show what each read costs apart from waiting on the disk
        runs: dict[str, list[float]] = {k: [] for k in cases}
        cpu: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(repeats):
            for key, fn in cases.items():
                out["dropped_page_cache"] = _drop_caches()
                t0, c0 = time.perf_counter(), time.process_time()
                got = fn()
                runs[key].append(got / 2**20 / (time.perf_counter() - t0))
                cpu[key].append((time.process_time() - c0) / (got / 2**30))
        for key, v in runs.items():
            out[f"{key}_MBps"] = sorted(v)[len(v) // 2]
            out[f"{key}_MBps_all"] = [round(x) for x in v]
            out[f"{key}_cpu_s_per_GiB"] = round(sorted(cpu[key])[len(v) // 2], 3)
        disk = out["disk_seq_MBps"]
        out["ratio_shards_to_disk"] = out["shards_MBps"] / disk
        out["ratio_verified_to_disk"] = out["shards_verified_MBps"] / disk
        out["ratio_sha256_to_disk"] = out["shards_sha256_MBps"] / disk
        # the same files read without verification: a baseline that loaded disks and CPUs affect alike
        out["ratio_verified_to_unverified"] = out["shards_verified_MBps"] / out["shards_MBps"]
        out["ratio_verified_to_raw_same_io"] = out["shards_verified_MBps"] / out["shards_raw_MBps"]
        return out


def _plan_for(case: str, cfg_path: str, overrides: list[str], device: str):
    from stackwise.config import load_config
    from stackwise.plan import plan_cache, plan_end_to_end, plan_stage

    cfg = load_config(cfg_path, overrides)
    kw = dict(dtype=cfg.train.dtype, device=device)
    if case == "stage":
        return plan_stage(cfg, world_size=1, zero_stage=0, cache_dtype="float32", **kw)
    if case == "cache":
        return plan_cache(cfg, cache_dtype="float32", **kw)
    return plan_end_to_end(cfg, world_size=1, zero_stage=0, keep_frozen_mlp=True, **kw)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--shape", choices=["config", "70b-layer"], default="config",
                    help="70b-layer: one d8192/ff28672/64-8-head layer, vocab 256, B*T=32, fp32")
    ap.add_argument("--cases", default=None, help="comma list of stage,cache,e2e,io (default: all for config, "
                    "stage,cache for 70b-layer)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--io_mb", type=int, default=512, help="MB of shards written for the io case")
    ap.add_argument("--io_repeats", type=int, default=3, help="reads of each kind in the io case (median reported)")
    ap.add_argument("--seq_lens", type=int, nargs="*", default=None,
                    help="also measure stage tok/s at these sequence lengths (throughput vs T plot)")
    ap.add_argument("--plot_dir", default=os.path.join(ROOT, "benchmarks", "results"), help="where PNGs go")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args(argv)
    preset = SHAPE_70B if args.shape == "70b-layer" else (DEFAULT_OVERRIDES if args.config.endswith("tiny.yaml")
                                                          else ["--model.attention.backend=torch"])
    # CPU runs float32 unless --train.dtype is given (bf16 autocast on CPU is measured for its memory, not speed)
    cpu_fp32 = args.device == "cpu" and not any(o.startswith("--train.dtype") for o in overrides)
    overrides = preset + overrides + ["--train.dtype=float32"] * cpu_fp32
    steps = args.steps or (2 if args.shape == "70b-layer" else 5)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker, args.config, overrides, steps, args.device)))
        return
    cases = (args.cases or ("stage,cache" if args.shape == "70b-layer" else "stage,cache,e2e,io")).split(",")
    results = {}
    for case in cases:
        if case == "io":
            r = _io_case(args.io_mb, 64, args.io_repeats)
            print(f"io: disk sequential {r['disk_seq_MBps']:.0f} MB/s | shards, np.load unverified "
                  f"{r['shards_MBps']:.0f} MB/s ({100 * r['ratio_shards_to_disk']:.0f}%) | store's verified read "
                  f"({r['hash']}) {r['shards_verified_MBps']:.0f} MB/s ({100 * r['ratio_verified_to_disk']:.0f}% of disk,"
                  f" {100 * r['ratio_verified_to_unverified']:.0f}% of np.load, "
                  f"{100 * r['ratio_verified_to_raw_same_io']:.0f}% of the same reads unhashed) | "
                  f"old whole-file sha256 {r['shards_sha256_MBps']:.0f} MB/s ({100 * r['ratio_sha256_to_disk']:.0f}%)"
                  f"; medians of {r['repeats']}, page cache dropped: {r['dropped_page_cache']}; CPU s/GiB: verified "
                  f"{r['shards_verified_cpu_s_per_GiB']}, np.load {r['shards_cpu_s_per_GiB']}, old sha256 "
                  f"{r['shards_sha256_cpu_s_per_GiB']}")
            print("JSON " + json.dumps(r))
            results[case] = r
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", case, "--config", args.config,
               "--device", args.device, "--steps", str(steps), "--shape", "config", *overrides]
        # a fixed mmap threshold makes glibc return every freed block over 64 KiB to the OS, so peak RSS counts
        # live tensors rather than glibc's heap high-water mark (its dynamic threshold keeps blocks < 32 MiB)
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"error: worker {case} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        plan = _plan_for(case, args.config, overrides, args.device)
        r.update(planned=plan.total, planned_parts=plan.parts, error=plan.total / r["measured"] - 1,
                 flops_per_token=plan.flops_per_token, gflops=plan.flops_per_token * r["tokens_per_s"] / 1e9,
                 shape=args.shape, device=args.device)
        print(f"{case:6s} B={r['B']} T={r['T']}: {r['tokens_per_s']:9.1f} tok/s ({r['gflops']:.1f} GFLOP/s) | "
              f"peak {r['peak'] / 2**30:.3f} GiB, baseline {r['baseline'] / 2**30:.3f} GiB (after imports "
              f"{r['rss_after_imports'] / 2**30:.3f}), peak - baseline "
              f"{r['measured'] / 2**30:.3f} GiB | planned {plan.total / 2**30:.3f} GiB ({100 * r['error']:+.1f}%)")
        print("JSON " + json.dumps(r))
        results[case] = r
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from plots import planned_vs_measured, throughput_vs_T

    tag = f"{args.shape}-{args.device}"
    png = planned_vs_measured(results, os.path.join(args.plot_dir, f"planned_vs_measured-{tag}.png"))
    if png:
        print(f"plot: {png}")
    sweep = []
    for T in args.seq_lens or []:
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "stage", "--config", args.config, "--device",
               args.device, "--steps", str(steps), "--shape", "config", *overrides, f"--data.seq_len={T}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"error: stage worker at T={T} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
        r = json.loads(line[0][7:])
        sweep.append(r)
        print(f"stage T={T}: {r['tokens_per_s']:.1f} tok/s")
        print("JSON " + json.dumps({"case": "stage_T", "T": T, "tokens_per_s": r["tokens_per_s"]}))
    png = throughput_vs_T(sweep, os.path.join(args.plot_dir, f"stage_throughput_vs_T-{tag}.png"))
    if png:
        print(f"plot: {png}")
    if "stage" in results and "e2e" in results:
        from stackwise.config import load_config

        L = load_config(args.config, overrides).model.n_layers
        ratio = results["stage"]["tokens_per_s"] / (results["e2e"]["tokens_per_s"] * L)
        print(f"stage tok/s / (e2e tok/s x n_layers={L}) = {ratio:.2f} (1.00 = no layer-wise overhead; the stage "
              f"also runs the head, which end-to-end amortises over {L} layers)")
        print("JSON " + json.dumps({"case": "summary", "stage_vs_e2e_per_layer": ratio, "n_layers": L}))


if __name__ == "__main__":
    main()
