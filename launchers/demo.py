# SPDX-License-Identifier: MIT
"""``make demo``: real text -> tokenizer and shards -> every stage -> fuse -> CLM fine-tune -> table -> samples.

Runs configs/small.yaml (override anything with --section.key=value). Rerunning skips finished stages (the
fine-tunes run again). The CLM sample comes from the CLM fine-tune; the diffusion samples from the fused model, or
with ``--diffusion_finetune_steps N`` from a joint diffusion fine-tune of it (N steps on the training objective;
its ELBO is a row of the table and in the JSON line).
"""

import dataclasses
import json
import resource
import time

from stackwise.data.datasets import build_datasets
from stackwise.engine.baselines import bits_per_byte, fused_elbo, heldout_reference
from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.finetune import fine_tune, finetune_source
from stackwise.engine.fuse import fuse
from stackwise.engine.report import demo_table, plot_run, read_metrics
from stackwise.engine.rundir import RunDir
from stackwise.engine.sample import DEMO_SAMPLERS, sample_text
from stackwise.engine.text_quality import continuation, text_stats, training_vocabulary
from stackwise.engine.stages import train_all

# off: 200 steps (41 s, past the demo's 6 minutes) lowered the ELBO 4.464 -> 4.322 but lifted one sampler's
# real-word rate only (benchmarks/RESULTS.md, session 12)
DIFFUSION_FT_STEPS = 0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


@main_guard
def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--diffusion_finetune_steps", type=int, default=DIFFUSION_FT_STEPS,
                   help=f"steps of the joint diffusion fine-tune the diffusion samples come from (default "
                        f"{DIFFUSION_FT_STEPS}; 0: sample the fused model)")
    args, cfg = parse(p)
    if args.diffusion_finetune_steps < 0:
        p.error(f"--diffusion_finetune_steps must be >= 0 (0: sample the fused model), "
                f"got {args.diffusion_finetune_steps}")
    t0 = time.time()
    ref = heldout_reference(cfg)  # refuses dummy data before any training
    train_all(cfg)
    fuse(cfg)
    ft = fine_tune(cfg, "clm")
    elbo = fused_elbo(cfg)
    run, rd = cfg.train.out_dir, RunDir(cfg)
    dft = None
    if args.diffusion_finetune_steps:
        dft = fine_tune(dataclasses.replace(cfg, train=dataclasses.replace(
            cfg.train, finetune_steps=args.diffusion_finetune_steps)), "diffusion")
    # each sampler names its model: a finetuned_diffusion left by an earlier run must not stand in for the fused one
    models = {"clm": rd.finetuned("clm"), "diffusion": rd.finetuned("diffusion") if dft else finetune_source(cfg, rd)}
    final = max((r for r in read_metrics(run) if r.get("kind") == "stage"), key=lambda r: r["stage"])["val_loss"]
    bpt = ref["bytes_per_token"]
    print(f"\nheld-out tokens: {ref['heldout_tokens']:,} ({bpt:.3f} bytes/token with the run's tokenizer); "
          f"bits/byte = nats / ln 2 / bytes per token (comparable across vocabularies)")
    dft_elbo = dft["val_elbo_nats_per_token"] if dft else None
    print(demo_table(run, ref, clm_loss=ft["val_loss"], elbo=elbo, diffusion_ft_elbo=dft_elbo))
    print(f"\nCLM fine-tune: held-out loss {ft['val_loss']:.3f}, perplexity {ft['val_perplexity']:.1f}, "
          f"{bits_per_byte(ft['val_loss'], bpt):.3f} bits/byte")
    ds = build_datasets(cfg)  # a sample's words against the training text's (stackwise.engine.text_quality)
    vocab = training_vocabulary(ds.tokenizer, str(ds.train.path), ds.train.dtype)
    real_words = {}
    for label, mode, prompt, kw in DEMO_SAMPLERS:
        path, text = sample_text(cfg, prompt, mode=mode, max_new_tokens=60, seed=1, checkpoint=models[mode], **kw)
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
               "diffusion_finetune_steps": args.diffusion_finetune_steps,
               "diffusion_finetune_elbo": round(dft_elbo, 4) if dft else None,
               "diffusion_finetune_elbo_bits_per_byte": round(bits_per_byte(dft_elbo, bpt), 4) if dft else None,
               "sample_real_word_rate": real_words, **ft}
    print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
