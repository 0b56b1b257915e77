#!/usr/bin/env bash
# SPDX-License-Identifier: MIT
# One prepared GPU check (issue 14): bash benchmarks/gpu_check.sh OUTDIR [--dry-run]
#
# Within about 8 minutes on one H100/H200 it runs, writing everything under OUTDIR:
#   1. pytest -m gpu tests/gpu                                  -> OUTDIR/pytest_gpu.txt
#   2. attn_bench.py --device cuda, bf16: flash (d64, d128) and MLA 192/128 at T 1k/4k/16k vs SDPA's flash
#      backend (and flash-attn when importable); feature attention M 256 at T 2k/8k/32k vs the flash path
#                                                               -> OUTDIR/attn_*.txt, *.csv, attn_rows.jsonl
#   3. gpu_targets.py stage8b: one Llama-3-8B-shaped stage with its 128k head (tokens/s, MFU, peak memory vs
#      the planner)                                             -> OUTDIR/stage8b.txt, stage8b.json
#   4. gpu_targets.py summary: every issue target as a ratio  -> OUTDIR/targets.txt, targets.json
# Each step has its own time limit and a failed step does not stop the others; the exit status is non-zero
# if any step failed. It needs only the repo and the machine's torch/Triton (no package downloads).
# --dry-run: CPU-sized versions of steps 2-4 (no GPU needed), to check the script itself.
set -u
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [--dry-run]}
DRY=${2:-}
if [ -n "$DRY" ] && [ "$DRY" != "--dry-run" ]; then
  echo "gpu_check.sh: unknown option '$DRY' (the only option is --dry-run)" >&2
  exit 2
fi
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
rm -f "$OUT/attn_rows.jsonl"
FAILED=()

step() {  # step NAME LIMIT_S LOGFILE CMD...
  local name=$1 limit=$2 log=$3
  shift 3
  local t0=$SECONDS
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$?
  echo "   rc $rc after $((SECONDS - t0)) s; log $OUT/$log"
  tail -n 3 "$OUT/$log" | sed 's/^/   | /'
  [ $rc -eq 0 ] || FAILED+=("$name (rc $rc)")
}

$PY - <<'PYEOF' > "$OUT/environment.txt" 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton not importable:", e)
PYEOF
cat "$OUT/environment.txt"

BENCH=(benchmarks/attn_bench.py --out-dir "$OUT")
if [ "$DRY" = "--dry-run" ]; then
  step "attn grid (dry run, cpu)" 300 attn_dry.txt $PY "${BENCH[@]}" --device cpu --op gqa64 mla feature \
    --mode fwd fwdbwd --T 256 --quick --features 32
  step "8B stage (dry run, small cpu)" 300 stage8b.txt $PY benchmarks/gpu_targets.py stage8b --out "$OUT" --steps 8 --small
else
  # time limits add up to 470 s; a step cut short keeps what it wrote (attn rows are appended as measured)
  step "pytest -m gpu" 150 pytest_gpu.txt $PY -m pytest -q -m gpu tests/gpu -rs -p no:cacheprovider
  GPU=(--device cuda --dtype bf16 --quick --mask causal bidir)
  step "attn: flash d128/d64" 100 attn_flash.txt $PY "${BENCH[@]}" "${GPU[@]}" --op gqa gqa64 --mode fwd fwdbwd \
    --T 1024 4096 16384 --providers triton sdpa_flash flash_attn
  step "attn: MLA 192/128" 45 attn_mla.txt $PY "${BENCH[@]}" "${GPU[@]}" --op mla --mode fwdbwd \
    --T 1024 4096 16384 --providers triton sdpa_pad
  step "attn: feature M256" 60 attn_feature.txt $PY "${BENCH[@]}" "${GPU[@]}" --op feature --features 256 \
    --mode fwdbwd --T 2048 8192 32768 --providers feature triton
  step "8B stage" 100 stage8b.txt $PY benchmarks/gpu_targets.py stage8b --out "$OUT" --steps 20
fi
step "targets" 15 targets.txt $PY benchmarks/gpu_targets.py summary --out "$OUT"
grep -v "^JSON" "$OUT/targets.txt"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  exit 1
fi
echo "all steps finished; results under $OUT"
