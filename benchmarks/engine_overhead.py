# SPDX-License-Identifier: MIT
"""The engine's overhead: one stage trained through ``stackwise.engine.loop.train_loop`` on the single backend
against a bare PyTorch loop doing the same forward, backward, clipping and AdamW step on the same batch.

Both sides start from the same weights and see the same batch (layer-k input h, diffusion views), alternate in
rounds (so drift of a shared machine hits both), and must end with the same loss (checked, printed). Reported:
median ms per step of each side, the overhead in percent, and a final ``JSON {...}`` line::

    python benchmarks/engine_overhead.py [--rounds 7] [--steps 4] [--config configs/tiny.yaml] [--key=value ...]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULTS = ["--model.d_model=256", "--model.n_heads=8", "--model.n_kv_heads=4", "--model.d_ff=768",
            "--model.vocab_size=4096", "--data.seq_len=128", "--train.batch_size=8", "--model.n_layers=2",
            "--train.log_interval=1000000", "--train.checkpoint_interval=0", "--train.warmup_steps=0"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "tiny.yaml"))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per round and side")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    args, overrides = ap.parse_known_args(argv)

    import torch
    import torch.nn.functional as F

    from stackwise.config import load_config
    from stackwise.engine.backends import StageModule, create_backend, param_groups
    from stackwise.engine.distributed import DistEnv
    from stackwise.engine.loop import train_loop
    from stackwise.engine.stage_model import trainable_params
    from stackwise.model import StackWiseLM
    from stackwise.objective import Objective

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = load_config(args.config, DEFAULTS + overrides)
    t, m, k = cfg.train, cfg.model, 1
    gen = torch.Generator().manual_seed(0)
    objective = Objective.from_config(cfg.objective, m, "diffusion")
    views = objective.mask(torch.randint(0, m.vocab_size - 1, (t.batch_size, cfg.data.seq_len), generator=gen), gen)
    batch = dict(views, x=torch.randn(t.batch_size, cfg.data.seq_len, m.d_model, generator=gen))

    base = StackWiseLM(m, layers=[k])
    eng_model, bare_model = base, copy.deepcopy(base)
    backend = create_backend("single", t, cfg.engine, DistEnv(), os.devnull)
    backend.build(StageModule(eng_model, [k], objective), trainable_params(eng_model, [k], cfg))
    bare_params = trainable_params(bare_model, [k], cfg)
    opt = torch.optim.AdamW(param_groups(bare_params, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2))
    params = list(bare_params.values())
    x, targets, lm = batch["x"], batch["targets"], batch["loss_mask"]

    def bare_steps(n: int) -> float:
        for _ in range(n):
            for g in opt.param_groups:
                g["lr"] = t.lr
            logits = bare_model.head(bare_model.run_layers(x, k, k + 1, objective.attention_mode))
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
            loss = (ce * lm.flatten()).sum() / lm.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    done = [0]
    run_root = tempfile.mkdtemp(prefix="stackwise-overhead-")

    def engine_steps(n: int) -> float:
        # a constant lr (min_lr_ratio 1) makes the engine's schedule match the bare loop's fixed lr
        train = dataclasses.replace(t, min_lr_ratio=1.0)
        r = train_loop(backend, lambda step: [batch], objective=objective, train=train, env=DistEnv(),
                       total=done[0] + n, base_lr=t.lr, label=k, run_root=run_root, start=done[0])
        done[0] += n
        return r.last_loss

    for fn in (bare_steps, engine_steps):  # warm-up: allocations, optimizer state, thread pools
        fn(1)
    times = {"bare": [], "engine": []}
    losses = {}
    for _ in range(args.rounds):
        for name, fn in (("bare", bare_steps), ("engine", engine_steps)):
            t0 = time.perf_counter()
            losses[name] = fn(args.steps)
            times[name].append((time.perf_counter() - t0) / args.steps * 1000)
    bare_ms, eng_ms = statistics.median(times["bare"]), statistics.median(times["engine"])
    overhead = 100 * (eng_ms / bare_ms - 1)
    same = abs(losses["bare"] - losses["engine"]) <= 1e-4 * max(1.0, abs(losses["bare"]))
    print(f"bare PyTorch  {bare_ms:8.1f} ms/step   (rounds: {', '.join(f'{v:.0f}' for v in times['bare'])})")
    print(f"engine        {eng_ms:8.1f} ms/step   (rounds: {', '.join(f'{v:.0f}' for v in times['engine'])})")
    print(f"overhead {overhead:+.1f}% | final loss bare {losses['bare']:.6f} engine {losses['engine']:.6f} "
          f"({'same' if same else 'DIFFERENT'}) | threads {torch.get_num_threads()}")
    print("JSON " + json.dumps({"bare_ms": round(bare_ms, 2), "engine_ms": round(eng_ms, 2),
                               "overhead_pct": round(overhead, 2), "same_loss": same, "rounds": args.rounds,
                               "steps": args.steps, "d_model": m.d_model, "batch": t.batch_size,
                               "seq_len": cfg.data.seq_len}))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
