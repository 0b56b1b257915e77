# SPDX-License-Identifier: MIT
"""Causal (CLM) sampling with a per-layer KV cache, for one prompt length or ragged (left-padded) batches."""

from __future__ import annotations

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
    sample_next,
)
from .kv_cache import MLA_CACHES, make_caches


def generate_clm(
    model,
    prompt_ids,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | list[torch.Generator] | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    mla_cache: str = "latent",
):
    """Sample a causal continuation of prompt_ids.

    Args:
        model: a ``StackWiseLM`` with every layer built.
        prompt_ids: [B, T0] int tensor (T0 >= 1), or a list of prompts of any lengths (1-D int tensors or
            lists of ints). A list is left-padded into one batch: padding keys are masked out of attention and
            each row's RoPE positions start at its first real token, so every row gets the logits it would get
            alone (within fp32 round-off). Ids in [0, vocab_size); moved to the model's device.
        max_new_tokens: tokens to add (>= 0); the longest prompt + max_new_tokens must be <= model.cfg.max_seq_len.
        temperature: 0 = greedy (argmax), otherwise logits are divided by it before sampling.
        top_k: keep only the k most likely tokens (0 = off).
        top_p: nucleus sampling; keep the smallest set of tokens with probability mass >= top_p (1 = off).
        generator: ``torch.Generator`` on the model's device (rows share its stream), or a list with one per row:
            row b then draws only from generator[b], so its tokens equal a one-prompt run with that generator.
        use_cache: prefill once into a per-layer cache and then run one token per step. Models with
            ``attention_type="kernel"`` have no KV cache and always recompute the whole prefix each step
            (logged once). ``use_cache=False`` forces recomputation for any model.
        eos_id: once a row emits it, the rest of that row is filled with eos_id; generation stops early
            when every row has finished (the output keeps its full length).
        mla_cache: MLA only: "latent" caches the KV latent and the RoPE key (mla_rkv + qk_rope_head_dim values per
            token and layer) and decodes with the up-projections absorbed; "expanded" caches per-head K and V.

    Returns:
        [B, T0 + max_new_tokens] int64 for a tensor prompt, or (list prompt) a list of 1-D int64 tensors, prompt b
        followed by its max_new_tokens tokens. The mask token (``model.mask_id``) is never generated.

    Raises:
        TypeError / ValueError: bad prompt, lengths, sampling settings or generator, with the fix.
    """
    _check_model(model)
    batch = _check_prompt(model, prompt_ids, min_len=1, allow_mask=True)
    _check_int("max_new_tokens", max_new_tokens, 0)
    _check_sampling(temperature, top_k, top_p)
    prompt = batch.ids
    B, T0 = prompt.shape
    _check_length(model, T0, max_new_tokens, "max_new_tokens")
    generator = _check_generator(generator, prompt.device, B)
    V = model.cfg.vocab_size
    if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < V):
        raise ValueError(f"eos_id must be None or an int in [0, model.vocab_size={V}), got {eos_id!r}")
    if mla_cache not in MLA_CACHES:
        raise ValueError(f"mla_cache must be one of {list(MLA_CACHES)}, got {mla_cache!r}")
    if max_new_tokens == 0:
        return batch.unpad(prompt.clone())

    kernel = model.cfg.attention.attention_type == "kernel"
    if kernel and batch.pad is not None:
        _log_once("kernel-ragged", "generate_clm: kernel (random-feature) attention takes no key mask; "
                  "prompts of different lengths run one at a time")
        kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, use_cache=use_cache, eos_id=eos_id)
        return [generate_clm(model, batch.row(b), max_new_tokens, generator=_row_generator(generator, b), **kw)[0]
                for b in range(B)]
    if use_cache and kernel:
        _log_once("kernel-no-cache", "generate_clm: kernel (random-feature) attention has no KV cache; "
                  "recomputing the whole prefix at every step")
    cached = use_cache and not kernel
    n_layers = model.cfg.n_layers
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = torch.empty(B, T0 + max_new_tokens, dtype=torch.long, device=prompt.device)
            out[:, :T0] = prompt
            finished = torch.zeros(B, dtype=torch.bool, device=prompt.device)
            caches = make_caches(model, mla_cache) if cached else None
            key_mask = batch.key_mask(T0)  # None unless some prompt is padded
            # prefill: only the last position's logits are needed
            h = model.run_layers(model.embed(prompt), 0, n_layers, "causal", caches=caches,
                                 start_pos=batch.positions(0, T0), key_mask=key_mask)
            logits = model.head(h[:, -1:])[:, -1]
            for t in range(max_new_tokens):
                pos = T0 + t
                logits = logits.float()
                logits[:, model.mask_id] = float("-inf")
                tok = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
                if eos_id is not None:
                    tok = torch.where(finished, torch.full_like(tok, eos_id), tok)
                    finished |= tok == eos_id
                out[:, pos] = tok
                if t == max_new_tokens - 1:
                    break
                if eos_id is not None and bool(finished.all()):
                    out[:, pos + 1 :] = eos_id
                    break
                key_mask = batch.key_mask(pos + 1)
                if cached:
                    h = model.run_layers(model.embed(tok[:, None]), 0, n_layers, "causal", caches=caches,
                                         start_pos=batch.positions(pos, pos + 1), key_mask=key_mask)
                else:
                    h = model.run_layers(model.embed(out[:, : pos + 1]), 0, n_layers, "causal",
                                         start_pos=batch.positions(0, pos + 1), key_mask=key_mask)
                logits = model.head(h[:, -1:])[:, -1]
    finally:
        model.train(was_training)
    return batch.unpad(out)
