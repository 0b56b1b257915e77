# SPDX-License-Identifier: MIT
"""Fault soak: many SIGKILL points through a whole run, a DeepSpeed rank kill, and random byte flips.

    python benchmarks/fault_soak.py                 # all three loops (a few minutes on 2 CPU cores)
    python benchmarks/fault_soak.py --kills 24 --flips 40 --no-ds

Kill loop: ``tests/faults/killer.py POINT N launchers/train_layerwise.py`` for every (point, N) in a grid, then
``train_layerwise.py --resume`` again (a real launcher each time); the layer files, fused model and caches must
equal an uninterrupted run bit for bit and no temp file may survive. DeepSpeed loop: a 2-rank torchrun stage
where rank 1 dies after the step-4 checkpoint: the job must stop (within the timeout) naming rank 1, and
``--resume`` must reproduce the uninterrupted layer. Flip loop: random single-byte flips in random artifacts;
each must be refused with the file's name, or (token data) rebuilt. Prints a table and one JSON line.
"""

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests", "faults"))
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
KILLER = os.path.join(ROOT, "tests", "faults", "killer.py")
# (point, calls) grid for the tiny 2-layer run of tests/faults/test_kill.py: 16 steps, 7 checkpoint writes,
# ~12 shard writes, 6 shard sets, 4 state saves
GRID = ([("step", n) for n in (1, 4, 7, 9, 12, 15)] + [("ckpt_tmp", n) for n in (1, 2, 3, 4, 6, 7)]
        + [("ckpt_rename", n) for n in (2, 3, 6)] + [("shard_tmp", n) for n in (1, 3, 6, 9)]
        + [("shard_add", n) for n in (2, 5, 8)] + [("shard_swap", n) for n in (1, 2, 4, 6)]
        + [("state_save", n) for n in (1, 3)])


def _run(args, cwd=ROOT, timeout=600, env=None):
    t = time.time()
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env or ENV,
                       timeout=timeout)
    return p, time.time() - t


def kill_loop(n: int, work: str) -> list[dict]:
    from stackwise.config import save_config
    from test_kill import assert_same, leftovers, make, snapshot

    ref = make(os.path.join(work, "ref"))
    save_config(ref, os.path.join(work, "ref.yaml"))
    p, _ = _run(["launchers/train_layerwise.py", "--config", os.path.join(work, "ref.yaml")])
    assert p.returncode == 0, p.stderr[-2000:]
    want = snapshot(ref)
    rows = []
    for point, k in GRID[:n]:
        out = os.path.join(work, f"{point}-{k}")
        cfg = make(out)
        path = out + ".yaml"
        save_config(cfg, path)
        p, dt = _run([KILLER, point, str(k), "launchers/train_layerwise.py", "--config", path])
        killed = p.returncode == -9
        p2, dt2 = _run(["launchers/train_layerwise.py", "--config", path, "--resume"])
        outcome = "ok"
        if p2.returncode != 0:
            outcome = f"resume failed: {p2.stderr.strip().splitlines()[-1][:120]}"
        else:
            try:
                assert_same(snapshot(cfg), want, f"{point}#{k}")
                if leftovers(out):
                    outcome = f"left behind {leftovers(out)}"
            except AssertionError as e:
                outcome = str(e)[:120]
        rows.append({"loop": "kill", "case": f"{point}#{k}", "killed": killed, "outcome": outcome,
                     "seconds": round(dt + dt2, 1)})
        print(f"kill {point}#{k}: killed={killed} {outcome}", file=sys.stderr)
    return rows


def ds_loop(work: str) -> list[dict]:
    sys.path.insert(0, os.path.join(ROOT, "tests", "engine"))
    from test_distributed import KILL, _layer, _torchrun

    script = os.path.join(work, "dskill.py")
    with open(script, "w") as f:
        f.write(KILL)
    args = ["--layer", "0", "--engine.backend=deepspeed", "--train.batch_size=8", "--engine.dist_timeout_s=60"]
    ref, out = os.path.join(work, "ds_ref"), os.path.join(work, "ds_killed")
    rows = []
    t = time.time()
    p = _torchrun("launchers/train_layer.py", ref, *args, port=29711)
    assert p.returncode == 0, p.stderr[-2000:]
    t = time.time()
    p = _torchrun([script, "launchers/train_layer.py"], out, *args, port=29712, env={"KILL_RANK": "1"}, timeout=300)
    named = "rank      : 1" in p.stderr or "rank 1" in p.stderr
    rows.append({"loop": "deepspeed", "case": "rank 1 dies after the step-4 checkpoint", "killed": p.returncode != 0,
                 "outcome": "ok: job stopped, rank 1 named" if p.returncode != 0 and named else
                 f"rc {p.returncode}, rank named={named}", "seconds": round(time.time() - t, 1)})
    t = time.time()
    p = _torchrun("launchers/train_layer.py", out, *args, "--resume", port=29713)
    outcome = "resume failed"
    if p.returncode == 0:
        a, b = _layer(out), _layer(ref)
        err = max(float((a[k] - b[k]).abs().max()) for k in b)
        outcome = f"ok: max |resumed - uninterrupted| = {err:.1e}" if err <= 1e-6 else f"differs by {err:.1e}"
    rows.append({"loop": "deepspeed", "case": "--resume after the rank kill", "killed": False, "outcome": outcome,
                 "seconds": round(time.time() - t, 1)})
    return rows


def flip_loop(n: int, work: str, seed: int = 0) -> list[dict]:
    """Random byte flips in random artifacts of a finished text run, each read by the code that uses it."""
    import test_corrupt as tc

    from stackwise.engine import cli

    base = os.path.join(work, "flip_base")
    os.makedirs(base)
    os.chdir(base)
    with open("corpus.txt", "w") as f:
        f.write(tc.TEXT)
    cfg = tc.cfg_of()
    tc.train_all(cfg)
    tc.fuse(cfg)
    tc.fine_tune(cfg, "clm")
    readers = {
        "run/layer_0.safetensors": lambda: tc.fuse(tc.cfg_of()),
        "run/layer_1.safetensors": lambda: tc.fuse(tc.cfg_of()),
        "run/fused.safetensors": lambda: tc.fine_tune(tc.cfg_of(), "clm"),
        "run/finetuned_clm.safetensors": lambda: tc.sample_text(tc.cfg_of(), "It was", max_new_tokens=2),
        "run/tokenizer.json": lambda: tc.sample_text(tc.cfg_of(), "It was", max_new_tokens=2),
        "run/acts/layer_0/train/shard_00000.h.npy": tc.retrain_stage1,
        "run/acts/layer_0/train/manifest.json": tc.retrain_stage1,
        "run/acts/views_train/shard_00001.targets.npy": tc.retrain_stage1,
        "run/acts/views_train/manifest.json": tc.retrain_stage1,
        "run/config.yaml": lambda: tc.train_stage(tc.cfg_of(), 1),
    }
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        rel = rng.choice(sorted(readers))
        case = os.path.join(work, f"flip{i}")
        shutil.copytree(base, case)
        os.chdir(case)
        data = bytearray(open(rel, "rb").read())
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        open(rel, "wb").write(bytes(data))
        t = time.time()
        # config.yaml only guards the run directory and is rewritten from --config: a flip outside the locked
        # model/objective/data sections is harmless
        outcome = ("ok: harmless, config.yaml rewritten" if rel == "run/config.yaml" else
                   "NOT DETECTED (ran normally)")
        try:
            cli.main_guard(readers[rel])()
        except SystemExit as e:
            outcome = "ok: refused by name" if e.code == 2 else f"exit {e.code}"
        except Exception as e:  # a traceback would escape the launcher
            outcome = f"TRACEBACK {type(e).__name__}: {str(e)[:80]}"
        rows.append({"loop": "flip", "case": f"{rel}@{pos}", "killed": False, "outcome": outcome,
                     "seconds": round(time.time() - t, 1)})
        os.chdir(work)
        shutil.rmtree(case, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=len(GRID), help=f"kill points to try (max {len(GRID)})")
    ap.add_argument("--flips", type=int, default=40)
    ap.add_argument("--no-ds", action="store_true", help="skip the 2-rank DeepSpeed loop")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="stackwise_soak_")
    t0 = time.time()
    rows = kill_loop(args.kills, work)
    if not args.no_ds:
        rows += ds_loop(work)
    rows += flip_loop(args.flips, work)
    os.chdir(ROOT)
    shutil.rmtree(work, ignore_errors=True)
    print("| loop | case | killed | outcome | s |\n|---|---|---|---|---:|")
    for r in rows:
        print(f"| {r['loop']} | {r['case']} | {r['killed']} | {r['outcome']} | {r['seconds']} |")
    summary = {}
    for r in rows:
        s = summary.setdefault(r["loop"], {"trials": 0, "ok": 0})
        s["trials"] += 1
        s["ok"] += r["outcome"].startswith("ok")
    print(json.dumps({"fault_soak": summary, "seconds": round(time.time() - t0, 1), "trials": rows}))


if __name__ == "__main__":
    main()
