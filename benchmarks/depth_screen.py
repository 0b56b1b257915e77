# SPDX-License-Identifier: MIT
"""Screening of issue-13 depth recipes on one (method, seed) at a time, through quality_bench.run_unit.

Adds recipe methods to quality_bench.METHODS (same views, order, optimizer, schedule and tokens as
``layerwise``) and prints the unit's JSON row (without the curve). Depth efficiency is computed against
``e2e1_long`` / ``e2e_long`` rows of the same seed by quality_eval.depth_summary when they are in the rows.

    OMP_NUM_THREADS=1 python benchmarks/depth_screen.py lw_init_prev 0
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality_bench as qb  # noqa: E402

RECIPES = {
    "lw_init_prev": {"kind": "stages", "layers_per_stage": 1, "overrides": {"train.stage_init_from": "previous"}},
    "lw_init_mid": {"kind": "stages", "layers_per_stage": 1, "overrides": {"train.stage_init_from": "middle"}},
    # budget split fixed a priori (same 1,600 total steps at the cpu size): early stages get more
    "lw_split_7333": {"kind": "stages", "layers_per_stage": 1, "overrides": {"train.stage_steps": "[700,300,300,300]"}},
    "lw_split_10222": {"kind": "stages", "layers_per_stage": 1,
                       "overrides": {"train.stage_steps": "[1000,200,200,200]"}},
    "lw_split_7333_prev": {"kind": "stages", "layers_per_stage": 1,
                           "overrides": {"train.stage_steps": "[700,300,300,300]", "train.stage_init_from": "previous"}},
}
qb.METHODS.update({k: v for k, v in RECIPES.items() if k not in qb.METHODS})

if __name__ == "__main__":
    method, seed = sys.argv[1], int(sys.argv[2])
    size = sys.argv[3] if len(sys.argv) > 3 else "cpu"
    row = qb.run_unit(dict(size=size, method=method, seed=seed, root=os.path.join("runs", "depth_screen", size),
                           device="cpu", verbose=False, threads=1))
    row.pop("curve", None)
    print("JSON " + json.dumps(row), flush=True)
