# SPDX-License-Identifier: MIT
"""benchmarks/kernel_compile_check.py --quick: the Triton kernels compile for sm_80 / sm_90 without a GPU.

Runs the script in a subprocess (it must import the kernels with ``TRITON_INTERPRET=0``, which this test
process cannot: conftest set the interpreter before the kernel modules were imported). About 15 s per run.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "kernel_compile_check.py")


def _run(*args):
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, SCRIPT, "--quick", *args], capture_output=True, text=True, env=env,
                          timeout=300)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("JSON ")]
    assert lines, f"no JSON line (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.returncode, json.loads(lines[-1][5:]), proc.stdout


def test_compile_check_quick():
    rc, out, stdout = _run()
    assert rc == 0, stdout
    assert out["compiles"] == 4 and out["failed"] == 0
    by_arch = {}
    for row in out["rows"]:
        assert row["ok"] and 0 < row["shared"] <= (163 if row["arch"] == "sm_80" else 227) * 1024, row
        assert row["mma"], row  # bf16 dots lower to tensor-core instructions on both archs
        by_arch.setdefault(row["arch"], []).append(row)
    assert set(by_arch) == {"sm_80", "sm_90"}
    assert not any(r["wgmma"] for r in by_arch["sm_80"]), "wgmma is sm_90 only"
    assert "flash_fwd D128" in stdout and "sm_90" in stdout


def test_compile_check_fails_over_shared_limit():
    rc, out, _ = _run("--max-shared-kib", "32")
    assert rc == 1
    assert out["failed"] >= 1 and all(r["shared"] > 32 * 1024 for r in out["rows"] if not r["ok"])
