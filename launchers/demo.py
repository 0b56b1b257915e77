# SPDX-License-Identifier: MIT
"""``make demo``: real text -> tokenizer and shards -> every stage -> fuse -> CLM fine-tune -> table -> samples.

Runs configs/small.yaml (override anything with --section.key=value). Rerunning skips finished work.
"""

import json
import time

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.finetune import fine_tune
from stackwise.engine.fuse import fuse
from stackwise.engine.report import plot_run, stage_table
from stackwise.engine.sample import sample_text
from stackwise.engine.stages import train_all


@main_guard
def main() -> None:
    _, cfg = parse(parser(__doc__.splitlines()[0]))
    t0 = time.time()
    train_all(cfg)
    fuse(cfg)
    ft = fine_tune(cfg, "clm")
    run = cfg.train.out_dir
    print("\nper-stage held-out masked-token loss (what each layer adds):")
    print(stage_table(run))
    print(f"\nCLM fine-tune: held-out loss {ft['val_loss']:.3f}, perplexity {ft['val_perplexity']:.1f}")
    for mode, prompt in (("clm", "ROMEO:\n"), ("diffusion", "KING HENRY:\n")):
        path, text = sample_text(cfg, prompt, mode=mode, max_new_tokens=60, seed=1)
        print(f"\n--- {mode} sample ({path}) ---\n{text}")
    plots = plot_run(run)
    print(f"\nplots: {', '.join(plots)}\ndemo finished in {time.time() - t0:.0f} s")
    print("JSON " + json.dumps({"demo_seconds": round(time.time() - t0, 1), **ft}))


if __name__ == "__main__":
    main()
