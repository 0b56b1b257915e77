# SPDX-License-Identifier: MIT
"""Masked-diffusion sampling by iterative unmasking (LLaDA-style), for one prompt length or ragged batches."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ._common import (
    _check_generator,
    _check_int,
    _check_length,
    _check_model,
    _check_prompt,
    _check_sampling,
    _log_once,
    _row_generator,
    filter_logits,
)

REMASKING = ("low_confidence", "random")


def diffusion_schedule(n_masked: int, steps: int) -> list[int]:
    """Tokens to commit at each of ``steps`` steps so that all ``n_masked`` are committed (linear schedule).

    Each step commits n_masked // steps tokens; the first n_masked % steps steps commit one more (LLaDA's
    ``get_num_transfer_tokens``), so the masked fraction falls linearly and reaches 0 at the last step.
    """
    base, extra = divmod(n_masked, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


def _split_steps(steps: int, n_blocks: int) -> list[int]:
    base, extra = divmod(steps, n_blocks)
    return [base + (1 if b < extra else 0) for b in range(n_blocks)]


def generate_diffusion(
    model,
    prompt_ids,
    gen_len: int,
    *,
    steps: int | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    generator: torch.Generator | list[torch.Generator] | None = None,
    block_len: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    top_k: int = 0,
    top_p: float = 1.0,
):
    """Masked-diffusion sampling by iterative unmasking (LLaDA-style).

    The continuation starts as ``gen_len`` mask tokens after the prompt. At each step the model (bidirectional
    attention) predicts every position; among the still-masked positions of the current block, a scheduled
    number (``diffusion_schedule``) is committed and the rest stay masked. With ``block_len`` the continuation
    is split into blocks of that length (the last may be shorter) unmasked left to right, the ``steps`` shared
    among blocks as evenly as possible (semi-autoregressive sampling).

    Args:
        model: a ``StackWiseLM`` with every layer built (any attention type).
        prompt_ids: [B, T0] int tensor (T0 may be 0), or a list of prompts of any lengths (1-D int tensors or
            lists of ints), left-padded into one batch with padding keys masked out and per-row RoPE positions;
            each row commits its own positions (its own confidences and masks). Ids in [0, vocab_size) and never
            the mask id; kept unchanged.
        gen_len: number of tokens to generate (>= 0); longest prompt + gen_len <= model.cfg.max_seq_len.
        steps: denoising steps (default gen_len, one token per step); at least the number of blocks.
        temperature: 0 commits the argmax; > 0 samples each prediction from softmax(logits / temperature).
        top_k, top_p: with temperature > 0, draw only among the k most likely tokens / the nucleus of mass
            top_p (as the CLM sampler; 0 and 1 = off). The confidence that "low_confidence" ranks by stays the
            unfiltered probability of the drawn token.
        remasking: "low_confidence" commits the positions whose prediction has the highest probability (the
            least confident stay masked); "random" commits uniformly chosen masked positions.
        generator: ``torch.Generator`` on the model's device, for temperature > 0 and "random" remasking; or
            one per row (a list), so that each row equals a one-prompt run with its generator.
        block_len: length of a semi-autoregressive block (default gen_len: one block).
        callback: called as ``callback(step, ids)`` after every step with the current ids [B, T0 + gen_len]
            (left-padded with ``PAD_ID`` for a list of prompts of different lengths).

    Returns:
        [B, T0 + gen_len] int64 for a tensor prompt, or (list prompt) a list of 1-D int64 tensors, with every
        generated position filled (never the mask id).
    """
    _check_model(model)
    batch = _check_prompt(model, prompt_ids, min_len=0, allow_mask=False)
    _check_int("gen_len", gen_len, 0)
    prompt = batch.ids
    B, T0 = prompt.shape
    _check_length(model, T0, gen_len, "gen_len")
    generator = _check_generator(generator, prompt.device, B)
    _check_sampling(temperature, top_k, top_p)
    if remasking not in REMASKING:
        raise ValueError(f"remasking must be one of {list(REMASKING)}, got {remasking!r}")
    if gen_len == 0:
        return batch.unpad(prompt.clone())
    block_len = gen_len if block_len is None else _check_int("block_len", block_len, 1)
    n_blocks = math.ceil(gen_len / block_len)
    steps = gen_len if steps is None else _check_int("steps", steps, 1)
    if steps < n_blocks:
        raise ValueError(
            f"steps ({steps}) must be >= the number of blocks ceil(gen_len / block_len) = {n_blocks}; "
            f"raise steps or block_len"
        )
    if model.cfg.attention.attention_type == "kernel" and batch.pad is not None:
        _log_once("kernel-ragged-diffusion", "generate_diffusion: kernel (random-feature) attention takes no key "
                  "mask; prompts of different lengths run one at a time")
        kw = dict(steps=steps, temperature=temperature, remasking=remasking, block_len=block_len, top_k=top_k,
                  top_p=top_p)
        return [generate_diffusion(model, batch.row(b), gen_len, generator=_row_generator(generator, b), **kw)[0]
                for b in range(B)]

    mask_id = model.mask_id
    x = torch.cat([prompt, torch.full((B, gen_len), mask_id, dtype=torch.long, device=prompt.device)], dim=1)
    key_mask, positions = batch.key_mask(T0 + gen_len), batch.positions(0, T0 + gen_len)
    offsets = torch.arange(gen_len, device=x.device)  # position within the continuation
    was_training = model.training
    model.eval()
    step = 0
    try:
        with torch.no_grad():
            for b, block_steps in enumerate(_split_steps(steps, n_blocks)):
                lo, hi = b * block_len, min((b + 1) * block_len, gen_len)
                in_block = (offsets >= lo) & (offsets < hi)
                for k in diffusion_schedule(hi - lo, block_steps):
                    if k > 0:
                        logits = _logits(model, x, T0, positions, key_mask)
                        xg = _commit(logits, x[:, T0:], in_block, k, temperature, remasking, generator, mask_id,
                                     top_k, top_p)
                        x = torch.cat([x[:, :T0], xg], dim=1)
                    if callback is not None:
                        callback(step, x)
                    step += 1
    finally:
        model.train(was_training)
    if bool((x[:, T0:] == mask_id).any()):  # internal invariant: the schedule commits every position
        raise RuntimeError("generate_diffusion left masked positions; this is a bug, please report it")
    return batch.unpad(x)


def _logits(model, x, T0, positions, key_mask) -> torch.Tensor:
    """Bidirectional forward of x [B, T]; fp32 logits of the continuation [B, T - T0, V], never the mask id."""
    h = model.run_layers(model.embed(x), 0, model.cfg.n_layers, "bidirectional", start_pos=positions,
                         key_mask=key_mask)
    logits = model.head(h[:, T0:]).float()
    logits[..., model.mask_id] = float("-inf")
    return logits


def _commit(logits, xg, in_block, k, temperature, remasking, generator, mask_id, top_k=0, top_p=1.0) -> torch.Tensor:
    """Commit k masked positions per row of the continuation xg [B, G] inside in_block [G]; logits [B, G, V].

    Random draws cover only the continuation, row by row when ``generator`` is a list, so a row's draws do
    not depend on the other rows or on their prompt lengths.
    """
    B, G = xg.shape
    probs = torch.softmax(logits, dim=-1)
    per_row = isinstance(generator, list)
    if temperature == 0:
        pred = logits.argmax(-1)
    else:
        sample_probs = torch.softmax(filter_logits(logits / temperature, top_k=top_k, top_p=top_p), dim=-1)
        if per_row:
            pred = torch.stack([torch.multinomial(sample_probs[b], 1, generator=g).squeeze(-1)
                                for b, g in enumerate(generator)])
        else:
            pred = torch.multinomial(sample_probs.flatten(0, 1), 1, generator=generator).view(B, G)
    if remasking == "low_confidence":
        conf = probs.gather(-1, pred.unsqueeze(-1)).squeeze(-1)
    elif per_row:
        conf = torch.cat([torch.rand((1, G), generator=g, device=xg.device) for g in generator])
    else:  # "random" (validated by the caller)
        conf = torch.rand((B, G), generator=generator, device=xg.device)
    candidates = (xg == mask_id) & in_block
    conf = conf.masked_fill(~candidates, float("-inf"))
    chosen = torch.zeros_like(candidates)
    chosen.scatter_(1, torch.topk(conf, k, dim=1).indices, True)
    return torch.where(chosen & candidates, pred, xg)
