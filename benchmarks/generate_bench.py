# SPDX-License-Identifier: MIT
"""Decoding with MLA's latent KV cache vs the expanded per-head cache, and ragged batches vs one at a time.

Cases:
- ``mla``: an MLA model at the SRD's attention dims (32 heads, qk_nope 128, qk_rope 64, v 128, mla_rkv 512,
  mla_rq 1024) and a small trunk (d_model 1024, d_ff 2048, vocab 1024). For each context length: prefill
  ``--batch`` x context tokens, then time ``--steps`` single-token decoding steps with each cache; report ms per
  decoding step, cache bytes per token (all layers) and the max abs difference of the two caches' logits.
- ``ragged``: a GQA model (d_model 256, 4 layers); ``--batch`` prompts of lengths spread over 8..128 tokens,
  64 new tokens each: one left-padded batch vs one prompt at a time (same per-row generators, tokens compared).

Usage::

    python benchmarks/generate_bench.py                  # both cases, fp32, 1 thread
    python benchmarks/generate_bench.py --case mla --contexts 512 2048 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from stackwise.config import config_from_dict  # noqa: E402
from stackwise.generate import cache_bytes, generate_clm, make_caches  # noqa: E402
from stackwise.model import StackWiseLM  # noqa: E402

MLA_MODEL = {"vocab_size": 1024, "d_model": 1024, "n_layers": 2, "n_heads": 32, "d_ff": 2048, "max_seq_len": 4096,
             "attention": {"attention_type": "mla", "backend": "torch", "mla_rq": 1024, "mla_rkv": 512,
                           "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128}}
GQA_MODEL = {"vocab_size": 1024, "d_model": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 2, "d_ff": 688,
             "max_seq_len": 512, "attention": {"attention_type": "gqa", "backend": "torch"}}


def _model(model_cfg: dict) -> StackWiseLM:
    torch.manual_seed(0)
    return StackWiseLM(config_from_dict({"model": model_cfg}).model).eval()


def _decode(model, ids, steps: int, mla_cache: str):
    """Prefill ids [B, T], then ``steps`` single-token steps (greedy); (seconds of the steps, caches, logits)."""
    n, T = model.cfg.n_layers, ids.shape[1]
    caches = make_caches(model, mla_cache)
    out = []
    with torch.no_grad():
        logits = model.head(model.run_layers(model.embed(ids), 0, n, "causal", caches, 0)[:, -1:])
        t0 = time.perf_counter()
        for s in range(steps):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            logits = model.head(model.run_layers(model.embed(tok), 0, n, "causal", caches, T + s))
            out.append(logits)
        dt = time.perf_counter() - t0
    return dt, caches, torch.cat(out, dim=1)


def bench_mla(contexts: list[int], batch: int, steps: int, repeats: int) -> list[dict]:
    model = _model(MLA_MODEL)
    rows = []
    for T in contexts:
        ids = torch.randint(0, 1000, (batch, T), generator=torch.Generator().manual_seed(T))
        row = {"context": T, "batch": batch, "steps": steps}
        logits = {}
        for kind in ("expanded", "latent"):
            best = float("inf")
            for _ in range(repeats):
                dt, caches, logits[kind] = _decode(model, ids, steps, kind)
                best = min(best, dt)
            row[f"{kind}_ms_per_step"] = round(1e3 * best / steps, 2)
            row[f"{kind}_cache_bytes_per_token"] = cache_bytes(caches) // (batch * (T + steps))
        row["max_abs_logit_diff"] = float((logits["latent"] - logits["expanded"]).abs().max())
        rows.append(row)
        print(f"mla context {T:5d} B={batch}: expanded {row['expanded_ms_per_step']:8.2f} ms/step "
              f"({row['expanded_cache_bytes_per_token']:,} B/token), latent {row['latent_ms_per_step']:8.2f} ms/step "
              f"({row['latent_cache_bytes_per_token']:,} B/token), max |dlogit| {row['max_abs_logit_diff']:.1e}")
    return rows


def bench_ragged(batch: int, new_tokens: int) -> dict:
    model = _model(GQA_MODEL)
    g = torch.Generator().manual_seed(0)
    lengths = [8 + (120 * i) // max(batch - 1, 1) for i in range(batch)]
    prompts = [torch.randint(0, 1000, (n,), generator=g) for n in lengths]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(batch)]  # noqa: E731
    kw = dict(temperature=1.0, top_k=50)
    t0 = time.perf_counter()
    batched = generate_clm(model, prompts, new_tokens, generator=gens(), **kw)
    t1 = time.perf_counter()
    single = [generate_clm(model, p[None], new_tokens, generator=gg, **kw)[0] for p, gg in zip(prompts, gens())]
    t2 = time.perf_counter()
    same = all(torch.equal(a, b) for a, b in zip(batched, single))
    res = {"batch": batch, "prompt_lengths": lengths, "new_tokens": new_tokens, "batched_s": round(t1 - t0, 3),
           "one_at_a_time_s": round(t2 - t1, 3), "tokens_equal": same}
    print(f"ragged B={batch} prompts {lengths[0]}..{lengths[-1]} tokens, {new_tokens} new: batched {res['batched_s']} s, "
          f"one at a time {res['one_at_a_time_s']} s, tokens equal: {same}")
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("all", "mla", "ragged"), default="all")
    ap.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = {"threads": args.threads, "dtype": "float32", "device": "cpu"}
    if args.case in ("all", "mla"):
        result["mla"] = bench_mla(args.contexts, args.batch, args.steps, args.repeats)
    if args.case in ("all", "ragged"):
        result["ragged"] = bench_ragged(max(args.batch, 2) * 2, 64)
    print("JSON " + json.dumps(result))


if __name__ == "__main__":
    main()
