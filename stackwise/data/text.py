# SPDX-License-Identifier: MIT
"""Real text for StackWise, in three modules re-exported here (the names this module always had):

- :mod:`.corpora`: bundled corpora, user files (plain text / JSONL, optionally .gz .bz2 .xz .zst), documents;
- :mod:`.tokenizer`: the ``tokenizers`` tokenizer with its mask token, byte-level BPE training, identity hash;
- :mod:`.token_shards`: ``prepare_text_data`` and the streamed, parallel build of train/val token shards.
"""

from __future__ import annotations

from .corpora import (
    _DOC_CHARS,
    _PACKAGES,
    CORPORA,
    DataError,
    TextSource,
    _kjv_books,
    _text_chunks,
    clean_play,
    corpus_files,
    file_kind,
    iter_documents,
    open_text,
    resolve_text_files,
    split_document,
)
from .token_shards import (
    FORMAT_VERSION,
    TextData,
    encode_pieces,
    file_sha256,
    prepare_text_data,
    token_dtype,
)
from .tokenizer import MASK_TOKENS, Tokenizer, _tokenizers, load_tokenizer, tokenizer_sha256, train_tokenizer

__all__ = [
    "CORPORA", "FORMAT_VERSION", "MASK_TOKENS", "DataError", "TextData", "TextSource", "Tokenizer", "clean_play",
    "corpus_files", "encode_pieces", "file_kind", "file_sha256", "iter_documents", "load_tokenizer", "open_text",
    "prepare_text_data", "resolve_text_files", "split_document", "token_dtype", "tokenizer_sha256",
    "train_tokenizer", "_DOC_CHARS", "_PACKAGES", "_kjv_books", "_text_chunks", "_tokenizers",
]
