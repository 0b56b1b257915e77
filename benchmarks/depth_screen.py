# SPDX-License-Identifier: MIT
"""Screening of issue-13 depth recipes on one (method, seed) at a time, through quality_bench.run_unit.

Runs any quality_bench method (the recipe methods live in quality_bench.METHODS: same views, order, optimizer,
schedule and total tokens as ``layerwise``) and prints the unit's JSON row (without the curve and config); ``--jsonl``
also appends the full row (with FLOPs) to a results file that ``quality_bench.py --report --out DIR`` turns
into the table, the depth-efficiency summary and the plots, next to ``e2e1_long`` / ``e2e_long`` rows of the
same seeds.

    OMP_NUM_THREADS=1 python benchmarks/depth_screen.py lw_overlap 0 --jsonl /tmp/dq/base4/results.jsonl --no_clm
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import quality_bench as qb  # noqa: E402
import quality_eval as qe  # noqa: E402




def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("method", choices=sorted(qb.METHODS))
    p.add_argument("seed", type=int)
    p.add_argument("size", nargs="?", default="cpu", choices=sorted(qb.SIZES))
    p.add_argument("--runs", default=os.path.join("runs", "depth_screen"), help="run directories root")
    p.add_argument("--jsonl", default="", help="append the full row (with FLOPs) to this results.jsonl")
    p.add_argument("--n_layers", type=int, default=0, help="model depth (default: the size's)")
    p.add_argument("--no_clm", action="store_true", help="skip the CLM fine-tune")
    p.add_argument("--size_set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="change the size's settings for this unit, e.g. lr=0.002 warmup=100 (schedule screening on "
                        "the training loss; the row records them)")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                   help="config overrides for this unit (screening on the training loss; the row records them)")
    a = p.parse_args(argv)
    qb.EXTRA_OVERRIDES[:] = a.overrides
    try:
        qb.apply_size_set(a.size, a.size_set)  # "false" -> False, "3e-3" -> 0.003
    except ValueError as e:
        p.error(str(e))
    spec = dict(size=a.size, method=a.method, seed=a.seed, root=os.path.join(a.runs, a.size), device="cpu",
                verbose=False, threads=1, n_layers=a.n_layers, no_clm=a.no_clm)
    row = qb.run_unit(spec)
    cfg = qb.build_cfg(a.size, a.method, a.seed, "unused", "cpu")
    n_views = cfg.objective.mask_draws * cfg.data.max_train_sequences
    row["flops"] = qe.method_flops(cfg, qb.METHODS[a.method], n_views=n_views, device="cpu")
    row["jobs"] = 1
    row["size_set"], row["overrides"] = a.size_set, a.overrides
    if a.jsonl:
        with open(a.jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
    print(qb.json_line(row), flush=True)
    return row


if __name__ == "__main__":
    main()
