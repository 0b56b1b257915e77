# SPDX-License-Identifier: MIT
"""Do a run's samples read as text? The real-word rate and distinct-word ratio of each sampler's continuations.

For one trained run (default ``configs/small.yaml``, i.e. what ``make demo`` leaves in ``runs/small``): ``--samples``
prompts, each the first ``--prompt_tokens`` tokens of a training window spread evenly over the training split (never
the held-out split), each continued by ``--new_tokens`` tokens with its own seed (prompt i: seed i), by every
sampler of the demo (``stackwise.engine.sample.DEMO_SAMPLERS``: CLM from the CLM fine-tune, the ancestral and the
left-to-right diffusion samplers from the fused denoiser) and, with ``--sweep``, the CLM and the ancestral sampler
each at the other's temperature / nucleus (the demo's differ: like for like), the left-to-right sampler at other
temperatures / nuclei and LLaDA-style low-confidence blocks. Scores (``stackwise.engine.text_quality``): the share of
the continuations' words that are words of the training split, and the mean share of distinct words per
continuation; the reference row scores held-out text cut to the same length (what real text gets). The first and
last word of every continuation are not scored (the cuts at token boundaries may split them).

Usage::

    python benchmarks/sample_quality.py                      # the demo's run, 24 samples of 60 tokens
    python benchmarks/sample_quality.py --config configs/small.yaml --samples 48 --sweep --threads 2

Prints one ``JSON {...}`` line per sampler and last ``JSON {"summary": {...}}``.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from stackwise.data.datasets import build_datasets  # noqa: E402
from stackwise.engine.cli import main_guard, parse, parser  # noqa: E402
from stackwise.engine.sample import DEMO_SAMPLERS, sample_texts  # noqa: E402
from stackwise.engine.text_quality import continuation, text_stats, training_vocabulary  # noqa: E402

_L2R = {"remasking": "random", "block_len": 1}
SWEEP = (
    # the same temperature / nucleus for both families: the demo's CLM samples at 0.8 / 0.95, its ancestral
    # diffusion sampler at 1 / 1 (the model's own distribution), so these rows compare them like for like
    ("clm: t 1, top-p 1", "clm", {"temperature": 1.0, "top_p": 1.0}),
    ("diffusion, ancestral: t 0.8, top-p 0.95", "diffusion",
     {"diffusion_temperature": 0.8, "remasking": "random", "top_p": 0.95}),
    ("diffusion, left to right: t 0.7, top-p 0.9", "diffusion", {**_L2R, "diffusion_temperature": 0.7, "top_p": 0.9}),
    ("diffusion, left to right: t 0.6, top-p 0.9", "diffusion", {**_L2R, "diffusion_temperature": 0.6, "top_p": 0.9}),
    ("diffusion, low confidence: blocks of 8, t 0.7, top-p 0.9", "diffusion",
     {"remasking": "low_confidence", "block_len": 8, "diffusion_temperature": 0.7, "top_p": 0.9}),
)


def samplers(sweep: bool) -> list[tuple[str, str, dict]]:
    """(label, mode, settings): the demo's samplers (their prompts aside), then the sweep's."""
    return [(label, mode, kw) for label, mode, _, kw in DEMO_SAMPLERS] + (list(SWEEP) if sweep else [])


def prompts_and_reference(ds, n: int, prompt_tokens: int, new_tokens: int) -> tuple[list[str], list[str]]:
    """``n`` prompts from training windows spread evenly; held-out text of ``new_tokens`` tokens as the reference."""
    tok, train, val = ds.tokenizer, ds.train, ds.val
    prompts = [tok.decode(train[i * len(train) // n][:prompt_tokens].tolist()) for i in range(n)]
    ref = [tok.decode(val[i * len(val) // n][prompt_tokens:prompt_tokens + new_tokens].tolist())
           for i in range(min(n, len(val)))]
    return prompts, ref


@main_guard
def main(argv: list[str] | None = None) -> dict:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=24, help="prompts (one seed each)")
    p.add_argument("--prompt_tokens", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=60)
    p.add_argument("--sweep", action="store_true",
                   help="also score CLM and ancestral at each other's temperature, and other left-to-right / "
                        "low-confidence settings")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    args, cfg = parse(p, argv)
    if min(args.samples, args.prompt_tokens, args.new_tokens) < 1:
        p.error("--samples, --prompt_tokens and --new_tokens must be >= 1")
    if cfg.data.dummy or cfg.data.val_fraction <= 0:
        p.error("sample_quality needs a text run with a held-out split (data.dummy=false, data.val_fraction > 0)")
    if args.prompt_tokens + args.new_tokens > cfg.data.seq_len:
        p.error(f"--prompt_tokens + --new_tokens ({args.prompt_tokens + args.new_tokens}) must be <= data.seq_len "
                f"({cfg.data.seq_len}), the length of the windows they are cut from; lower them")
    if args.threads:
        torch.set_num_threads(args.threads)
    ds = build_datasets(cfg)
    vocab = training_vocabulary(ds.tokenizer, str(ds.train.path), ds.train.dtype)
    prompts, ref = prompts_and_reference(ds, args.samples, args.prompt_tokens, args.new_tokens)
    rows = [{"sampler": "held-out text (reference)", **text_stats(ref, vocab, drop_edges=True)}]
    print("JSON " + json.dumps(rows[0]), flush=True)
    for label, mode, kw in samplers(args.sweep):
        t0 = time.time()
        path, texts = sample_texts(cfg, prompts, mode=mode, max_new_tokens=args.new_tokens,
                                   seed=list(range(args.samples)), **kw)
        cont = [continuation(t, q) for t, q in zip(texts, prompts)]
        row = {"sampler": label, "checkpoint": os.path.relpath(path), **kw, **text_stats(cont, vocab, drop_edges=True),
               "seconds": round(time.time() - t0, 1), "example": prompts[0] + cont[0]}
        rows.append(row)
        print("JSON " + json.dumps(row), flush=True)
    print(f"\n{args.samples} prompts of {args.prompt_tokens} training tokens, {args.new_tokens} new tokens each; "
          f"{len(vocab):,} words in the training split")
    print("| sampler | real-word rate | distinct-word ratio | words | s |\n|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['sampler']} | {r['real_word_rate']:.3f} | {r['distinct_word_ratio']:.3f} | {r['words']} | "
              f"{r.get('seconds', '')} |")
    summary = {r["sampler"]: {k: r[k] for k in ("real_word_rate", "distinct_word_ratio", "words")} for r in rows}
    print("JSON " + json.dumps({"summary": summary}))
    return summary


if __name__ == "__main__":
    main()
