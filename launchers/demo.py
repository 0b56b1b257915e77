# SPDX-License-Identifier: MIT
"""``make demo``: real text -> tokenizer and shards -> every stage -> fuse -> CLM fine-tune -> table -> samples.

Runs configs/small.yaml (override anything with --section.key=value). Rerunning skips finished work.
"""

import json
import resource
import time

from stackwise.data.datasets import build_datasets
from stackwise.engine.baselines import bits_per_byte, fused_elbo, heldout_reference
from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.finetune import fine_tune
from stackwise.engine.fuse import fuse
from stackwise.engine.report import demo_table, plot_run, read_metrics
from stackwise.engine.sample import DEMO_SAMPLERS, sample_text
from stackwise.engine.text_quality import continuation, text_stats, training_vocabulary
from stackwise.engine.stages import train_all

def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@main_guard
def main() -> None:
    _, cfg = parse(parser(__doc__.splitlines()[0]))
    t0 = time.time()
    ref = heldout_reference(cfg)  # refuses dummy data before any training
    train_all(cfg)
    fuse(cfg)
    ft = fine_tune(cfg, "clm")
    elbo = fused_elbo(cfg)
    run = cfg.train.out_dir
    final = max((r for r in read_metrics(run) if r.get("kind") == "stage"), key=lambda r: r["stage"])["val_loss"]
    bpt = ref["bytes_per_token"]
    print(f"\nheld-out tokens: {ref['heldout_tokens']:,} ({bpt:.3f} bytes/token with the run's tokenizer); "
          f"bits/byte = nats / ln 2 / bytes per token (comparable across vocabularies)")
    print(demo_table(run, ref, clm_loss=ft["val_loss"], elbo=elbo))
    print(f"\nCLM fine-tune: held-out loss {ft['val_loss']:.3f}, perplexity {ft['val_perplexity']:.1f}, "
          f"{bits_per_byte(ft['val_loss'], bpt):.3f} bits/byte")
    ds = build_datasets(cfg)  # a sample's words against the training text's (stackwise.engine.text_quality)
    vocab = training_vocabulary(ds.tokenizer, str(ds.train.path), ds.train.dtype)
    real_words = {}
    for label, mode, prompt, kw in DEMO_SAMPLERS:
        path, text = sample_text(cfg, prompt, mode=mode, max_new_tokens=60, seed=1, **kw)
        # scored as benchmarks/sample_quality.py scores: the continuation's first and last word left out (the 60th
        # token may cut the last one)
        st = text_stats([continuation(text, prompt)], vocab, drop_edges=True)
        real_words[label] = round(st["real_word_rate"], 3) if st["words"] else None
        print(f"\n--- {label} sample ({path}) ---\n{text}\n[real words: {st['real_words']} of {st['words']} are words "
              f"of the training text (first and last word unscored)]")
    plots = plot_run(run)
    wall = time.time() - t0
    print(f"\nplots: {', '.join(plots)}\ndemo finished in {wall:.0f} s wall, {cpu_seconds():.0f} s CPU")
    summary = {"unigram_loss": round(ref["unigram_loss"], 4), "final_masked_loss": round(final, 4),
               "final_masked_bits_per_byte": round(bits_per_byte(final, bpt), 4),
               "clm_bits_per_byte": round(bits_per_byte(ft["val_loss"], bpt), 4), "diffusion_elbo": round(elbo, 4),
               "diffusion_elbo_bits_per_byte": round(bits_per_byte(elbo, bpt), 4), "bytes_per_token": round(bpt, 4),
               "demo_seconds": round(wall, 1), "cpu_seconds": round(cpu_seconds(), 1),
               "sample_real_word_rate": real_words, **ft}
    print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
