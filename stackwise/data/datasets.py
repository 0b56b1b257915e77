# SPDX-License-Identifier: MIT
"""Datasets the trainer consumes: fixed-length token windows read from a memmapped shard, and ``build_datasets``.

``TokenSequences`` serves non-overlapping windows of ``seq_len`` ids from a ``train.bin``/``val.bin`` written by
:func:`stackwise.data.text.prepare_text_data` (or any raw nanoGPT-style id file, given its dtype). The file is
read through ``np.memmap`` and never loaded whole. Opening it verifies it against ``meta.json``: size, dtype and
sha256, plus a scan for ids >= vocab_size and for the mask id, in one streamed pass of 16 MiB blocks (about
1 GB/s, so tens of MB cost well under a second; pass ``verify=False`` to skip the hash and scan on huge data).

``build_datasets(cfg)`` picks dummy Markov tokens or real text from ``cfg.data`` and checks the tokenizer against
``cfg.model`` (vocab size, mask id) with messages that name the fields to change.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, StackWiseConfig
from .dummy import DummyTokens
from .text import DataError, TextData, Tokenizer, load_tokenizer, prepare_text_data

log = logging.getLogger("stackwise")

_SCAN_BLOCK = 1 << 24


class TokenSequences(torch.utils.data.Dataset):
    """Non-overlapping windows ``ids[i*seq_len:(i+1)*seq_len]`` of a token shard, as ``LongTensor[seq_len]``.

    Args:
        bin_path: a shard with ``meta.json`` beside it (as built by ``prepare_text_data``), or a raw id file.
        seq_len: tokens per item (``data.seq_len``); a trailing partial window is dropped.
        vocab_size: every id must be below it; defaults to meta.json's vocab_size.
        dtype: id dtype; read from meta.json, or required (and trusted) for a raw file without one.
        verify: hash and scan the file against meta.json on open (default); False checks only the size.

    Raises:
        DataError: missing/truncated/corrupted file, dtype mismatch, ids >= vocab_size, the mask id in the data,
            or fewer tokens than one sequence. Each message names the file and the fix.
    """

    def __init__(self, bin_path: str | os.PathLike, seq_len: int, *, vocab_size: int | None = None,
                 dtype: str | np.dtype | None = None, verify: bool = True):
        self.path = Path(bin_path)
        self.seq_len = seq_len
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        rebuild = f"delete {self.path.parent} and rerun to rebuild it"
        if not self.path.is_file():
            raise DataError(f"token shard {self.path} does not exist; {rebuild} (prepare_text_data writes it)")
        entry, meta = self._meta_entry(dtype, rebuild)
        self.dtype = np.dtype(meta["dtype"] if meta else dtype)
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32), np.dtype(np.int32), np.dtype(np.int64)):
            raise DataError(f"token shard dtype must be uint16, uint32, int32 or int64, got {self.dtype}")
        size = self.path.stat().st_size
        expected = entry["n_tokens"] * self.dtype.itemsize if entry else size - size % self.dtype.itemsize
        if size != expected:
            raise DataError(
                f"token shard {self.path} is truncated or not the file meta.json describes: {size} bytes, expected "
                f"{expected} ({expected // self.dtype.itemsize} {self.dtype} ids); {rebuild}"
            )
        self.n_tokens = size // self.dtype.itemsize
        self.vocab_size = vocab_size if vocab_size is not None else (meta["vocab_size"] if meta else None)
        self.mask_id = meta.get("mask_id") if meta else None
        if verify:
            self._scan(entry, rebuild)
        if self.n_tokens < seq_len:
            raise DataError(
                f"data.seq_len ({seq_len}) is longer than {self.path}, which holds {self.n_tokens} tokens; lower "
                f"data.seq_len to <= {self.n_tokens}, or add text (data.text_files / data.corpus)"
            )
        self._mm: np.memmap | None = None

    def _meta_entry(self, dtype, rebuild: str) -> tuple[dict | None, dict | None]:
        """The meta.json record of this file (and the whole meta), or (None, None) for a raw file with a dtype."""
        meta_path = self.path.parent / "meta.json"
        if not meta_path.is_file():
            if dtype is None:
                raise DataError(
                    f"{meta_path} is missing, so {self.path.name} cannot be verified (a build writes meta.json last, "
                    f"so the build was interrupted); {rebuild}, or pass dtype= to read a raw id file unchecked"
                )
            return None, None
        try:
            meta = json.loads(meta_path.read_text())
            entry = next(e for e in meta["files"].values() if e["file"] == self.path.name)
        except (json.JSONDecodeError, KeyError, StopIteration) as e:
            raise DataError(f"{meta_path} is unreadable or does not list {self.path.name} ({e!r}); {rebuild}") from None
        if dtype is not None and np.dtype(dtype) != np.dtype(meta["dtype"]):
            raise DataError(f"dtype={np.dtype(dtype)} was requested but {meta_path} says {meta['dtype']}; drop dtype=")
        return entry, meta

    def _scan(self, entry: dict | None, rebuild: str) -> None:
        """One streamed pass: sha256 against meta.json, the largest id, and whether the mask id occurs."""
        h, max_id, has_mask = hashlib.sha256(), -1, False
        with open(self.path, "rb") as f:
            while block := f.read(_SCAN_BLOCK - _SCAN_BLOCK % self.dtype.itemsize):
                h.update(block)
                ids = np.frombuffer(block, dtype=self.dtype)
                if len(ids):
                    max_id = max(max_id, int(ids.max()))
                    has_mask = has_mask or (self.mask_id is not None and bool((ids == self.mask_id).any()))
        if entry is not None and h.hexdigest() != entry["sha256"]:
            raise DataError(
                f"token shard {self.path} is corrupted: its sha256 {h.hexdigest()[:16]}... differs from "
                f"{entry['sha256'][:16]}... recorded in meta.json; {rebuild}"
            )
        if self.vocab_size is not None and max_id >= self.vocab_size:
            raise DataError(
                f"token shard {self.path} holds id {max_id}, but ids must be < vocab_size {self.vocab_size}; the "
                f"data was built with a larger vocabulary: raise model.vocab_size to >= {max_id + 1} or {rebuild}"
            )
        if has_mask:
            raise DataError(
                f"token shard {self.path} contains the mask id {self.mask_id}, which the objective reserves; {rebuild}"
            )

    def __len__(self) -> int:
        return self.n_tokens // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} sequences of {self.path}")
        if self._mm is None:
            # opened lazily so that DataLoader workers each map the file themselves
            self._mm = np.memmap(self.path, dtype=self.dtype, mode="r")
        window = self._mm[i * self.seq_len : (i + 1) * self.seq_len]
        return torch.from_numpy(window.astype(np.int64))

    def __getstate__(self) -> dict:
        # pickling an np.memmap copies the whole array; workers reopen the file instead
        return {**self.__dict__, "_mm": None}

    def __repr__(self) -> str:
        return f"TokenSequences({str(self.path)!r}, seq_len={self.seq_len}, n={len(self)}, dtype={self.dtype})"


@dataclass
class Datasets:
    """What ``build_datasets`` returns: train and val sets, the tokenizer (None for dummy data), the mask id."""

    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset | None
    tokenizer: Tokenizer | None
    mask_id: int
    description: str
    text: TextData | None = None


def build_datasets(cfg: StackWiseConfig) -> Datasets:
    """Train/val datasets for ``cfg``: dummy Markov tokens, or a corpus / text files through token shards.

    Dummy validation uses the training chain (same successor table) with other sequences. Text validation is the
    held-out end of every document; ``data.val_fraction=0`` gives ``val=None``.

    Raises:
        ConfigError: the tokenizer does not fit the model (vocab size, mask id) or no text is configured.
        DataError: missing corpus package, missing/corrupt files, too little text for ``data.seq_len``.
    """
    d, m = cfg.data, cfg.model
    if d.dummy:
        n_val = max(8, d.dummy_sequences // 8)
        train = DummyTokens(m.vocab_size, d.seq_len, d.dummy_sequences, seed=d.seed, mask_id=m.mask_id)
        # other sequence seeds, same chain: train items use generator seeds seed*1_000_003 + [1, n], val the next block
        val = DummyTokens(m.vocab_size, d.seq_len, n_val, seed=d.seed + 1, table_seed=d.seed, mask_id=m.mask_id)
        desc = f"dummy Markov tokens: {len(train)} train + {n_val} val sequences of {d.seq_len}, vocab {m.vocab_size}"
        return Datasets(train=train, val=val, tokenizer=None, mask_id=m.mask_id, description=desc)
    if not d.corpus and not d.text_files:
        raise ConfigError(
            "data.dummy is false but data.corpus and data.text_files are both empty; set data.corpus=shakespeare "
            "(or kjv, shakespeare+kjv), data.text_files=[path/or/glob.txt], or data.dummy=true"
        )
    if not d.tokenizer and m.mask_id != m.vocab_size - 1:
        raise ConfigError(
            f"model.mask_token_id ({m.mask_token_id}) must be -1 (the last id, {m.vocab_size - 1}) when StackWise "
            f"trains the tokenizer, which puts [MASK] last; set model.mask_token_id=-1 or give data.tokenizer"
        )
    # a user tokenizer with more ids than model.vocab_size is refused in there, naming model.vocab_size
    text = prepare_text_data(d, m.vocab_size)
    tok = load_tokenizer(text.tokenizer_path, vocab_size=m.vocab_size)
    if tok.mask_id != m.mask_id:
        raise ConfigError(
            f"model.mask_token_id resolves to {m.mask_id} but tokenizer {d.tokenizer or text.tokenizer_path} has "
            f"{tok.mask_token} = {tok.mask_id}; set model.mask_token_id={tok.mask_id}"
        )
    train = TokenSequences(text.train_path, d.seq_len, vocab_size=m.vocab_size)
    val = None
    if d.val_fraction > 0:
        if text.n_val_tokens < d.seq_len:
            raise DataError(
                f"data.val_fraction ({d.val_fraction}) holds out {text.n_val_tokens} tokens in {text.data_dir}, fewer "
                f"than one sequence of data.seq_len ({d.seq_len}); raise data.val_fraction, lower data.seq_len, add "
                f"text, or set data.val_fraction=0 to train without validation"
            )
        val = TokenSequences(text.val_path, d.seq_len, vocab_size=m.vocab_size)
    desc = f"{text.description}; {len(train)} train / {len(val) if val else 0} val sequences of {d.seq_len}"
    log.info("data: %s", desc)
    return Datasets(train=train, val=val, tokenizer=tok, mask_id=tok.mask_id, description=desc, text=text)
