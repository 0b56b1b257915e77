# SPDX-License-Identifier: MIT
"""The tokenizer: a Hugging Face ``tokenizers`` JSON plus its mask token; byte-level BPE training; identity hash."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

from .._fs import atomic_write
from .corpora import DataError

MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")


def _tokenizers():
    """The ``tokenizers`` module, imported on first use: it is the optional ``data`` extra, and dummy runs
    (and ``import stackwise.data``) must work without it."""
    try:
        import tokenizers
    except ImportError:
        raise RuntimeError(
            "text data needs the tokenizers package (>= 0.15), which is not installed; "
            "run: pip install 'tokenizers>=0.15' (or pip install -e '.[data]')"
        ) from None
    return tokenizers


class Tokenizer:
    """A ``tokenizers`` tokenizer plus its mask token: ``encode``, ``decode``, ``mask_id``, ``vocab_size``, ``path``.

    ``vocab_size`` is the largest id + 1 (added tokens included), the smallest ``model.vocab_size`` that fits.
    ``encode`` adds no BOS/EOS and maps the literal text of a special token (``[MASK]``) to its id, which a
    prompt may want; corpus shards are encoded with special-token matching off, so data never holds the mask id.
    """

    def __init__(self, path: str | os.PathLike, *, mask_token: str | None = None):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(
                f"tokenizer file {self.path} does not exist; fix data.tokenizer or leave it '' to train one"
            )
        tokenizers = _tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(f"{self.path} is not a tokenizers JSON file ({e}); save it with Tokenizer.save()") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        names = (mask_token,) if mask_token else MASK_TOKENS
        found = [t for t in names if t in vocab]
        if not found:
            raise DataError(
                f"tokenizer {self.path} has no mask token (looked for {', '.join(names)}); add one and save, e.g. "
                f"tok.add_special_tokens(['[MASK]']); tok.save(path), then set model.mask_token_id to its id"
            )
        self.mask_token = found[0]
        self.mask_id = vocab[self.mask_token]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, mask={self.mask_token!r}:{self.mask_id})"


def load_tokenizer(path: str | os.PathLike, *, vocab_size: int | None = None) -> Tokenizer:
    """Load a tokenizer JSON; with ``vocab_size`` (the model's) check that every id fits.

    Raises:
        DataError: missing or unreadable file, no mask token, or ids beyond ``vocab_size``.
    """
    tok = Tokenizer(path)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {tok.path} has {tok.vocab_size} ids but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {tok.vocab_size}"
        )
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenizer, no prefix space) of ``vocab_size`` ids; ``[MASK]`` is the last.

    BPE learns up to ``vocab_size - 1`` tokens; when the text is too small for that many merges, filler special
    tokens ``<|unused_i|>`` pad the vocabulary so ``[MASK]`` still lands on ``vocab_size - 1``. Writes ``path``.

    Raises:
        DataError: ``vocab_size`` < 257 (256 byte tokens + [MASK]).
    """
    if vocab_size < 257:
        raise DataError(
            f"model.vocab_size must be >= 257 to train a byte-level BPE (256 byte tokens + [MASK]), got {vocab_size}; "
            f"set model.vocab_size (e.g. 8192), or point data.tokenizer at a tokenizer.json"
        )
    tokenizers = _tokenizers()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size - 1:
        raise RuntimeError(f"BPE trainer returned {n} tokens for vocab_size {vocab_size - 1}")
    tok.add_special_tokens([f"<|unused_{i}|>" for i in range(vocab_size - 1 - n)] + ["[MASK]"])
    if tok.token_to_id("[MASK]") != vocab_size - 1:
        raise RuntimeError(f"[MASK] got id {tok.token_to_id('[MASK]')}, expected {vocab_size - 1}")
    atomic_write(path, lambda tmp: tok.save(tmp))
    return Tokenizer(path, mask_token="[MASK]")


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """Identity of a tokenizers JSON: sha256 of its canonical JSON (sorted keys, no whitespace).

    Re-saving or re-indenting the file keeps the hash; any change to the vocab, merges, added tokens or
    normalizer/pre-tokenizer changes it. A file that is not JSON is hashed as bytes.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return hashlib.sha256(raw).hexdigest()
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()
