# SPDX-License-Identifier: MIT
"""``make demo``: real text -> tokenizer and shards -> every stage -> fuse -> CLM fine-tune -> table -> samples.

Runs configs/small.yaml (override anything with --section.key=value). Rerunning skips finished work.
"""

import json
import resource
import time

from stackwise.engine.baselines import bits_per_byte, fused_elbo, heldout_reference
from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.finetune import fine_tune
from stackwise.engine.fuse import fuse
from stackwise.engine.report import demo_table, plot_run, read_metrics
from stackwise.engine.sample import sample_text
from stackwise.engine.stages import train_all

# samplers: CLM nucleus sampling (temperature 0.8, top-p 0.95); diffusion the masked-diffusion model's own
# ancestral sampler (positions unmasked in random order, each drawn at temperature 1 from the whole
# distribution), which the ELBO scores, and the same denoiser unmasking left to right one position per step
# (semi-autoregressive blocks of 1 token, temperature 0.8 and, since session 7, the CLM sample's nucleus 0.95):
# each token is drawn with all the text before it known, which reads closest to text at this model size
# (session 6, compared by eye on run D's fused model with blocks of 1, 2, 4, 8 and the whole window).
# Greedy low-confidence commits (the earlier default) fill the window with the most frequent tokens first:
# newlines, speaker names, "Exit"
SAMPLES = (("clm", "clm", "ROMEO:\n", {}),
           ("diffusion, ancestral: random order", "diffusion", "KING HENRY:\n",
            {"diffusion_temperature": 1.0, "remasking": "random", "top_p": 1.0}),
           ("diffusion, left to right: blocks of 1", "diffusion", "KING HENRY:\n",
            {"diffusion_temperature": 0.8, "remasking": "random", "block_len": 1, "top_p": 0.95}))


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
    for label, mode, prompt, kw in SAMPLES:
        path, text = sample_text(cfg, prompt, mode=mode, max_new_tokens=60, seed=1, **kw)
        print(f"\n--- {label} sample ({path}) ---\n{text}")
    plots = plot_run(run)
    wall = time.time() - t0
    print(f"\nplots: {', '.join(plots)}\ndemo finished in {wall:.0f} s wall, {cpu_seconds():.0f} s CPU")
    summary = {"unigram_loss": round(ref["unigram_loss"], 4), "final_masked_loss": round(final, 4),
               "final_masked_bits_per_byte": round(bits_per_byte(final, bpt), 4),
               "clm_bits_per_byte": round(bits_per_byte(ft["val_loss"], bpt), 4), "diffusion_elbo": round(elbo, 4),
               "diffusion_elbo_bits_per_byte": round(bits_per_byte(elbo, bpt), 4), "bytes_per_token": round(bpt, 4),
               "demo_seconds": round(wall, 1), "cpu_seconds": round(cpu_seconds(), 1), **ft}
    print("JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
