# SPDX-License-Identifier: MIT
"""benchmarks/kernel_compile_check.py --quick: the Triton kernels compile for sm_80 / sm_90 without a GPU.

Runs the script in a subprocess (it must import the kernels with ``TRITON_INTERPRET=0``, which this test
process cannot: conftest set the interpreter before the kernel modules were imported). About 15 s for the
first run (5 cold compiles); the second reuses its Triton cache.
"""

import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_compile_check.py")
# one Triton cache for both runs: the second compiles nothing (its rows then have no register counts)
CACHE = tempfile.mkdtemp(prefix="sw_compile_test_")


def _run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "0", "STACKWISE_COMPILE_CACHE": CACHE}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("JSON ")]
    assert lines, f"no JSON line (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.returncode, json.loads(lines[-1][5:]), proc.stdout


def test_compile_check_quick():
    rc, out, stdout = _run()
    assert rc == 0, stdout
    assert out["compiles"] == 5 and out["failed"] == 0
    by_arch = {}
    for row in out["rows"]:
        assert row["status"] == "ok" and 0 < row["shared"] <= (163 if row["arch"] == "sm_80" else 227) * 1024, row
        by_arch.setdefault(row["arch"], []).append(row)
    assert set(by_arch) == {"sm_80", "sm_90"}
    # bf16 dots lower to mma.sync on Ampere and to wgmma on Hopper, the MLA (192/128) backward included
    assert all(r["tc"] == "mma" for r in by_arch["sm_80"]), by_arch["sm_80"]
    assert all(r["tc"] == "wgmma" for r in by_arch["sm_90"]), by_arch["sm_90"]
    kernels = {(r["kernel"], r["config"].split()[0]) for r in by_arch["sm_90"]}
    assert {("flash_bwd_dq", "D192/128"), ("flash_bwd_dkv", "D192/128"), ("flash_fwd", "D128/128")} <= kernels
    assert out["flash_sm90_lowp_wgmma"] == "3/3"


def test_compile_check_fails_over_shared_limit():
    rc, out, _ = _run("--max-shared-kib", "32")
    assert rc == 1
    failed = [r for r in out["rows"] if r["status"] != "ok"]
    assert out["failed"] == len(failed) >= 1
    assert all(r["status"] == "SHARED > 32 KiB" and r["shared"] > 32 * 1024 for r in failed), failed
