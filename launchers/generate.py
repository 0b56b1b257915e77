# SPDX-License-Identifier: MIT
"""Sample from a run: ``python launchers/generate.py --config FILE --mode clm|diffusion --prompt TEXT``.

--prompt may be repeated: the prompts (any lengths) run as one left-padded batch, each with its own
generator seeded by --seed, so each continuation equals a one-prompt run with the same --seed.

--mode clm samples left to right with a KV cache (from finetuned_clm, else the fused model); --mode
diffusion starts the continuation all-[MASK] and unmasks it over --steps iterations: --remasking picks which
positions each step commits (low_confidence: the most confident first; random: the masked-diffusion model's own
ancestral order), --diffusion_temperature draws them (0: argmax) and --block_len unmasks the continuation in
left-to-right blocks. The demo's second diffusion sample is
``--remasking random --diffusion_temperature 0.8 --block_len 1``. --checkpoint PATH picks another model.
"""

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.sample import sample_texts


@main_guard
def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--prompt", action="append", default=None,
                   help="text to continue (token ids separated by spaces for dummy runs); repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--steps", type=int, default=None, help="diffusion steps (default: max_new_tokens)")
    p.add_argument("--temperature", type=float, default=0.8, help="clm sampling temperature")
    p.add_argument("--top_k", type=int, default=0,
                   help="draw among the k most likely tokens (clm; diffusion with --diffusion_temperature > 0)")
    p.add_argument("--top_p", type=float, default=0.95,
                   help="nucleus: draw within this probability mass (clm; diffusion with --diffusion_temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--remasking", choices=("low_confidence", "random"), default="low_confidence",
                   help="diffusion: which masked positions each step commits")
    p.add_argument("--diffusion_temperature", type=float, default=0.0,
                   help="diffusion: temperature of the committed tokens (0: argmax)")
    p.add_argument("--block_len", type=int, default=None,
                   help="diffusion: unmask left to right in blocks of this many tokens (default: one block)")
    args, cfg = parse(p)
    path, texts = sample_texts(cfg, args.prompt or [""], mode=cfg.objective.fine_tune_mode,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                               top_p=args.top_p, steps=args.steps, seed=args.seed,
                               diffusion_temperature=args.diffusion_temperature, block_len=args.block_len,
                               remasking=args.remasking)
    print(f"[{path}]\n" + "\n\n".join(texts))


if __name__ == "__main__":
    main()
