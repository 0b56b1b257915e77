# SPDX-License-Identifier: MIT
"""benchmarks/gpu_targets.py summary: each issue-14 target becomes the right ratio from attn_bench rows and the
8B-stage JSON (fabricated inputs: this checks the arithmetic of the report, not any GPU figure)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_targets  # noqa: E402


def _row(op, provider, mode, causal, T, ms, tflops=None, M=None):
    return {"op": op, "provider": provider, "mode": mode, "causal": causal, "T": T, "dtype": "bf16", "ms": ms,
            "tflops": tflops, "M": M, "path": "torch" if provider == "feature" else None}


def test_targets_ratios(tmp_path):
    rows = []
    for causal in (True, False):
        rows += [_row("gqa", "triton", "fwdbwd", causal, 4096, 10.0), _row("gqa", "sdpa_flash", "fwdbwd", causal, 4096, 12.0),
                 _row("gqa", "triton", "fwd", causal, 4096, 3.0, tflops=495.0),
                 _row("mla", "triton", "fwdbwd", causal, 4096, 8.0), _row("mla", "sdpa_pad", "fwdbwd", causal, 4096, 6.0),
                 _row("feature", "feature", "fwdbwd", causal, 32768, 10.0, M=256),
                 _row("feature", "feature", "fwdbwd", causal, 8192, 2.5, M=256),
                 _row("feature", "triton", "fwdbwd", causal, 32768, 400.0)]
    (tmp_path / "attn_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "stage8b.json").write_text(json.dumps({"mfu": 0.4, "mem_ratio": 1.05, "tokens_per_s": 1.0,
                                                       "device": "x"}))
    got = {t["target"]: t["ratio"] for t in gpu_targets.targets(str(tmp_path))}
    assert got["flash fwd+bwd d128 T4k causal vs SDPA flash"] == 1.2
    assert got["flash fwd d128 T4k bidir >= 450 TFLOP/s"] == 1.1
    assert got["MLA 192/128 fwd+bwd T4k causal vs SDPA (V padded)"] == 0.75
    assert got["feature T32k causal >= 20x faster than flash"] == 2.0
    assert got["feature bidir linear in T: time(32k)/time(8k) <= 4.4"] == 1.1
    assert got["8B stage MFU >= 50%"] == 0.8
    assert got["8B stage peak memory within 10% of the planner"] == 2.0
    assert len(got) == 12


def test_targets_unmeasured(tmp_path):
    assert all(t["ratio"] is None for t in gpu_targets.targets(str(tmp_path)))
    assert gpu_targets.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_targets.peak_flops("NVIDIA H100 PCIe") == 756e12 and gpu_targets.peak_flops("a cpu") is None
