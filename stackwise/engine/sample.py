# SPDX-License-Identifier: MIT
"""Text in, text out: pick a run's model, tokenize a prompt, run the CLM or diffusion sampler, decode."""

from __future__ import annotations

import os

import torch

from ..config import StackWiseConfig
from ..generate import generate_clm, generate_diffusion
from . import checkpoint as ckpt
from .rundir import RunDir, pick_device


# The demo's samplers (label, mode, prompt, settings): CLM nucleus sampling (temperature 0.8, top-p 0.95);
# diffusion the masked-diffusion model's own ancestral sampler (positions unmasked in random order, each drawn at
# temperature 1 from the whole distribution), which the ELBO scores, and the same denoiser unmasking left to right
# one position per step (semi-autoregressive blocks of 1 token, temperature 0.8 and, since session 7, the CLM
# sample's nucleus 0.95): each token is drawn with all the text before it known, which reads closest to text at
# this model size (session 6, compared by eye on run D's fused model with blocks of 1, 2, 4, 8 and the whole
# window). Greedy low-confidence commits (the earlier default) fill the window with the most frequent tokens
# first: newlines, speaker names, "Exit". ``benchmarks/sample_quality.py`` scores them.
DEMO_SAMPLERS = (("clm", "clm", "ROMEO:\n", {}),
                 ("diffusion, ancestral: random order", "diffusion", "KING HENRY:\n",
                  {"diffusion_temperature": 1.0, "remasking": "random", "top_p": 1.0}),
                 ("diffusion, left to right: blocks of 1", "diffusion", "KING HENRY:\n",
                  {"diffusion_temperature": 0.8, "remasking": "random", "block_len": 1, "top_p": 0.95}))


def pick_checkpoint(cfg: StackWiseConfig, mode: str) -> str:
    """``train.checkpoint`` if set, else finetuned_<mode>, else the fused model of the run."""
    run = RunDir(cfg)
    for path in (cfg.train.checkpoint, run.finetuned(mode), run.fused):
        if path and os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"no model to sample from in {run.root} (looked for {run.finetuned(mode)} and {run.fused}); train and fuse "
        f"first, or pass --checkpoint PATH"
    )


def sample_text(cfg: StackWiseConfig, prompt: str, **kwargs) -> tuple[str, str]:
    """Generate a continuation of ``prompt``; returns (checkpoint used, decoded text incl. the prompt).
    Keyword arguments as :func:`sample_texts`."""
    path, texts = sample_texts(cfg, [prompt], **kwargs)
    return path, texts[0]


def sample_texts(cfg: StackWiseConfig, prompts: list[str], *, mode: str = "clm", max_new_tokens: int = 64,
                 temperature: float = 0.8, top_k: int = 0, top_p: float = 0.95, steps: int | None = None,
                 seed: int | list[int] = 0, checkpoint: str | None = None, diffusion_temperature: float = 0.0,
                 block_len: int | None = None, remasking: str = "low_confidence") -> tuple[str, list[str]]:
    """Continue every prompt in one batch (any lengths); returns (checkpoint used, decoded texts incl. prompts).

    ``mode="clm"`` samples left to right with a KV cache; "diffusion"/"mlm" unmask all new positions over
    ``steps`` iterations (default max_new_tokens) with ``remasking`` ("low_confidence": the most confident
    predictions first; "random": positions in random order, the masked-diffusion model's own ancestral
    sampler), committing the argmax (``diffusion_temperature=0``) or a sample at that temperature (filtered by
    ``top_k`` / ``top_p`` as in CLM), over one window or left-to-right blocks of ``block_len`` tokens. Every
    prompt draws from its own generator seeded with ``seed`` (one int for all, or a list with one per prompt),
    so its text is the one a one-prompt call with that seed gives.
    """
    from ..data.text import load_tokenizer

    path = checkpoint or pick_checkpoint(cfg, mode)
    device = pick_device(cfg)
    model, mcfg = ckpt.load_model(path, device=device)
    tok_path = RunDir(cfg).tokenizer
    if not os.path.isfile(tok_path) and not mcfg.data.dummy:
        from ..data.text import DataError

        # without it the prompt would silently be read as token ids
        raise DataError(f"tokenizer {tok_path} is missing but {path} was trained on text; copy tokenizer.json from "
                        f"the run's data directory (data.data_dir) back into {RunDir(cfg).root}, or retrain")
    # a damaged tokenizer that still parses must at least fit the model it feeds
    tok = load_tokenizer(tok_path, vocab_size=mcfg.model.vocab_size) if os.path.isfile(tok_path) else None
    if tok is not None and tok.mask_id != mcfg.model.mask_id:
        from ..data.text import DataError

        raise DataError(f"tokenizer {tok_path} has mask id {tok.mask_id} but {path} was trained with "
                        f"{mcfg.model.mask_id}; it was modified or belongs to another run: restore it")
    # dummy-data runs have no tokenizer: a prompt is a space-separated list of token ids
    prompt_ids = [tok.encode(p) if tok is not None else [int(t) for t in p.split()] for p in prompts]
    seeds = [seed] * len(prompts) if isinstance(seed, int) else list(seed)
    if len(seeds) != len(prompts):
        raise ValueError(f"seed: {len(seeds)} seeds for {len(prompts)} prompts; give one int or one seed per prompt")
    g = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    if mode == "clm":
        out = generate_clm(model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           generator=g)
    else:
        out = generate_diffusion(model, prompt_ids, max_new_tokens, steps=steps, temperature=diffusion_temperature,
                                 generator=g, block_len=block_len, remasking=remasking, top_k=top_k, top_p=top_p)
    texts = [tok.decode(r.tolist()) if tok is not None else " ".join(map(str, r.tolist())) for r in out]
    return path, texts
