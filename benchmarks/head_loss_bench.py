# SPDX-License-Identifier: MIT
"""The output head at masked positions only (``Objective.head_loss``) against the head at every position.

One training step (forward, masked cross-entropy, backward) of a stage of ``--config`` (default
configs/small.yaml: d 192, vocab 1024, B 16 x T 128), with ``--layers`` trained layers, on one diffusion batch;
the two sides alternate in rounds on the same weights and views (so drift of a shared machine hits both) and
must give the same loss (checked). Printed: median ms per step of each side, the speed-up, the float32 logits
each side materialises, and a final ``JSON {...}`` line::

    python benchmarks/head_loss_bench.py [--layers 1 4] [--rounds 7] [--threads 2] [--key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "small.yaml"))
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4], help="trained layers per stage, one run each")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=2, help="steps per round and side")
    ap.add_argument("--threads", type=int, default=2)
    args, overrides = ap.parse_known_args(argv)

    import torch

    from stackwise.config import load_config
    from stackwise.engine.stage_module import StageModule
    from stackwise.model import StackWiseLM
    from stackwise.objective import Objective

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, overrides)
    m, t = cfg.model, cfg.train
    gen = torch.Generator().manual_seed(0)
    objective = Objective.from_config(cfg.objective, m, "diffusion")
    views = objective.mask(torch.randint(0, m.vocab_size - 1, (t.batch_size, cfg.data.seq_len), generator=gen), gen)
    rate = float(views["loss_mask"].float().mean())
    rows = []
    for n in args.layers:
        if not 1 <= n <= m.n_layers:
            ap.error(f"--layers {n}: must be in [1, model.n_layers={m.n_layers}]")
        stage = StageModule(StackWiseLM(m), list(range(n)), objective)

        def full():
            return objective.loss(stage.logits(views["x"]), views["targets"], views["loss_mask"])

        def scored():
            return stage(views["x"], views["targets"], views["loss_mask"])

        sides = {"full": full, "scored": scored}
        ms = {k: [] for k in sides}
        losses = {}
        for fn in sides.values():  # warm-up (allocator, first-call kernel choice), not timed
            fn().backward()
        for _ in range(args.rounds):
            for name, fn in sides.items():
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    stage.zero_grad(set_to_none=True)
                    loss = fn()
                    loss.backward()
                ms[name].append((time.perf_counter() - t0) / args.steps * 1e3)
                losses[name] = float(loss.detach())
        if abs(losses["full"] - losses["scored"]) > 1e-5 * abs(losses["full"]):
            raise SystemExit(f"the two sides disagree: {losses}")
        med = {k: statistics.median(v) for k, v in ms.items()}
        n_pos = t.batch_size * cfg.data.seq_len
        row = {"layers": n, "full_ms": round(med["full"], 1), "scored_ms": round(med["scored"], 1),
               "speedup": round(med["full"] / med["scored"], 3),
               "positions": n_pos, "scored_positions": int(views["loss_mask"].sum()),
               "full_logits_mib": round(n_pos * m.vocab_size * 4 / 2**20, 2),
               "scored_logits_mib": round(int(views["loss_mask"].sum()) * m.vocab_size * 4 / 2**20, 2),
               "loss": round(losses["full"], 6)}
        rows.append(row)
        print(f"{n} layer(s): head at every position {row['full_ms']} ms/step, at masked positions only "
              f"{row['scored_ms']} ms/step ({row['speedup']}x); float32 logits {row['full_logits_mib']} -> "
              f"{row['scored_logits_mib']} MiB; loss {row['loss']} on both", flush=True)
    out = {"config": os.path.relpath(args.config, ROOT), "mask_rate": round(rate, 4), "threads": args.threads,
           "batch": [t.batch_size, cfg.data.seq_len], "vocab_size": m.vocab_size, "d_model": m.d_model, "rows": rows}
    print("JSON " + json.dumps(out))
    return out


if __name__ == "__main__":
    main()
