# SPDX-License-Identifier: MIT
"""Reference points for a run's held-out losses: the unigram baseline, bytes per token and bits per byte.

A loss in nats per token depends on the tokenizer (a bigger vocabulary packs more bytes into a token), so runs
with different vocabularies are compared in **bits per byte**: ``nats_per_token / ln 2 / bytes_per_token``, with
bytes per token measured on the same held-out text by the run's own tokenizer. The **unigram baseline** is the
cross-entropy of the held-out tokens under the token frequencies of the training split (a model that ignores
context): what a trained model's loss should be compared with.

The held-out tokens are those every evaluation of a run uses: ``train.eval_sequences`` windows of
``data.seq_len`` tokens spread evenly over the held-out split (the masked views, the CLM fine-tune's and the
ELBO's inputs; :func:`~stackwise.engine.evaluate.heldout_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ..config import StackWiseConfig
from .evaluate import heldout_rows

__all__ = ["bits_per_byte", "bytes_per_token", "fused_elbo", "heldout_reference", "unigram_cross_entropy"]


def unigram_cross_entropy(train_ids, eval_ids, vocab_size: int, *, alpha: float = 1.0,
                          exclude: Sequence[int] = ()) -> float:
    """Cross-entropy (nats/token) of ``eval_ids`` under the unigram of ``train_ids``, add-``alpha`` smoothed.

    ``p(v) = (count_train(v) + alpha) / (N_train + alpha * V')`` over the ``V'`` ids not in ``exclude`` (e.g. the
    mask id, which text never holds). With ``alpha=0`` and ``eval_ids`` drawn from the same counts this is the
    entropy of the training unigram.

    Raises:
        ValueError: empty inputs, ids outside [0, vocab_size), alpha < 0, or an eval id of probability zero.
    """
    tr = np.asarray(train_ids, dtype=np.int64).ravel()
    ev = np.asarray(eval_ids, dtype=np.int64).ravel()
    if tr.size == 0 or ev.size == 0:
        raise ValueError(f"unigram_cross_entropy needs training and held-out ids, got {tr.size} and {ev.size}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (add-alpha smoothing), got {alpha}")
    lo, hi = min(int(tr.min()), int(ev.min())), max(int(tr.max()), int(ev.max()))
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must lie in [0, vocab_size={vocab_size}), got ids in [{lo}, {hi}]")
    counts = np.bincount(tr, minlength=vocab_size).astype(np.float64) + alpha
    keep = np.ones(vocab_size, dtype=bool)
    keep[list(exclude)] = False
    counts[~keep] = 0.0
    probs = counts / counts.sum()
    p_eval = probs[ev]
    if (p_eval == 0).any():
        raise ValueError("a held-out id never occurs in the training ids and alpha=0 gives it probability 0; "
                         "use alpha > 0")
    return float(-np.log(p_eval).mean())


def bits_per_byte(nats_per_token: float, bytes_per_tok: float) -> float:
    """A loss in nats per token as bits per byte of the text: nats / ln 2 / (bytes per token)."""
    if not bytes_per_tok > 0:
        raise ValueError(f"bytes per token must be > 0, got {bytes_per_tok}")
    return nats_per_token / math.log(2.0) / bytes_per_tok


def bytes_per_token(tokenizer, ids) -> float:
    """UTF-8 bytes per token of the text that ``ids`` (one contiguous stretch) decode to with ``tokenizer``."""
    ids = [int(i) for i in np.asarray(ids).ravel()]
    if not ids:
        raise ValueError("bytes_per_token needs at least one token id")
    return len(tokenizer.decode(ids).encode("utf-8")) / len(ids)


def _eval_ids(ds_val, cfg: StackWiseConfig) -> np.ndarray:
    """The held-out ids every evaluation reads (``train.eval_sequences`` windows spread over the split), back to
    back."""
    return torch.cat([ds_val[i] for i in heldout_rows(len(ds_val), cfg.train.eval_sequences)]).numpy()


def heldout_reference(cfg: StackWiseConfig) -> dict:
    """Unigram baseline and bytes per token of a text run's held-out tokens (see the module docstring).

    Returns ``{"unigram_loss" (nats/token), "bytes_per_token", "heldout_tokens", "train_tokens"}``.

    Raises:
        ValueError: dummy data (no text, so no bytes).
    """
    if cfg.data.dummy:
        raise ValueError("bits per byte need text: data.dummy is true; set data.dummy=false with data.corpus or "
                         "data.text_files")
    from ..data.datasets import build_datasets

    ds = build_datasets(cfg)
    train = np.memmap(ds.text.train_path, dtype=np.dtype(ds.text.dtype), mode="r")
    ev = _eval_ids(ds.val, cfg)
    unigram = unigram_cross_entropy(train, ev, cfg.model.vocab_size, exclude=(cfg.model.mask_id,))
    return {"unigram_loss": unigram, "bytes_per_token": bytes_per_token(ds.tokenizer, ev),
            "heldout_tokens": int(ev.size), "train_tokens": int(train.size)}


def fused_elbo(cfg: StackWiseConfig, path: str | None = None) -> float:
    """Diffusion ELBO bound (nats/token) of the run's fused model (or ``path``) on the held-out tokens."""
    from ..data.datasets import build_datasets
    from . import checkpoint as ckpt
    from .evaluate import diffusion_elbo
    from .rundir import RunDir, pick_device

    device = pick_device(cfg)
    model, mcfg = ckpt.load_model(path or RunDir(cfg).fused, device=device)
    ds = build_datasets(cfg)
    return diffusion_elbo(model, ds.val, batch_size=cfg.train.batch_size, limit=cfg.train.eval_sequences,
                          seed=cfg.train.seed + 1, device=device, mask_id=mcfg.model.mask_id)
