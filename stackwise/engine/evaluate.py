# SPDX-License-Identifier: MIT
"""Held-out evaluation: masked-token loss/accuracy per policy, CLM perplexity, the diffusion ELBO bound.

The masked-diffusion bound (Sahoo et al. 2024; Shi et al. 2024): for a sequence x of length T,
-log p(x) <= E_{t ~ U(0, 1]} [ (1 / t) * sum_{masked i} -log p(x_i | x_t) ], where x_t masks each token
with probability t. We estimate the integral with a midpoint rule over ``n_t`` rates and report it per
token (nats/token); exact-count masking with round(t T) positions stands in for Bernoulli masking.
"""

from __future__ import annotations

import math

import torch

from ..objective import diffusion_mask, mask_tokens, masked_accuracy, masked_loss


def heldout_rows(n_rows: int, limit: int) -> list[int]:
    """The rows of a held-out split that every evaluation reads: ``limit`` windows spread evenly over its
    ``n_rows`` (all of them when it has no more). The split holds the last part of every document, in document
    order, so its first windows are the endings of the first few documents only; a spread sample costs the same
    and stands for the whole split."""
    n = min(n_rows, limit)
    return [i * n_rows // n for i in range(n)]


def _batches(data, batch_size: int, limit: int):
    rows = heldout_rows(len(data), limit)
    for s in range(0, len(rows), batch_size):
        yield torch.stack([data[i] for i in rows[s:s + batch_size]])


@torch.no_grad()
def eval_policy(model, data, policy: str, *, batch_size: int, limit: int, seed: int, device, mask_kw: dict) -> dict:
    """Token-weighted mean loss and accuracy of ``policy`` ("clm" | "mlm" | "diffusion") on ``data``."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    mode = "causal" if policy == "clm" else "bidirectional"
    tot = acc = n = 0.0
    for ids in _batches(data, batch_size, limit):
        masked, tgt, lm = mask_tokens(ids, policy, g, **mask_kw)
        logits = model(masked.to(device), attention_mode=mode)
        k = float(lm.sum())
        tot += float(masked_loss(logits, tgt.to(device), lm.to(device))) * k
        acc += float(masked_accuracy(logits, tgt.to(device), lm.to(device))) * k
        n += k
    model.train(was)
    loss = tot / max(n, 1)
    out = {"loss": loss, "acc": acc / max(n, 1)}
    if policy == "clm":
        out["perplexity"] = math.exp(min(loss, 50.0))
    return out


@torch.no_grad()
def diffusion_elbo(model, data, *, batch_size: int, limit: int, seed: int, device, mask_id: int, n_t: int = 8) -> float:
    """Upper bound on the NLL in nats per token (lower is better); see the module docstring."""
    was = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    total, tokens = 0.0, 0
    for ids in _batches(data, batch_size, limit):
        B, T = ids.shape
        per_seq = torch.zeros(B)
        for i in range(n_t):
            t = (i + 0.5) / n_t
            masked, tgt, lm, _ = diffusion_mask(ids, g, mask_id=mask_id, rate=t)
            logits = model(masked.to(device), attention_mode="bidirectional").float().cpu()
            ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="none").view(B, T)
            per_seq += (ce * lm).sum(1) / t / n_t
        total += float(per_seq.sum())
        tokens += B * T
    model.train(was)
    return total / max(tokens, 1)
