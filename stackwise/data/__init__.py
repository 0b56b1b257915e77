# SPDX-License-Identifier: MIT
"""Data: dummy token data for smoke tests, bundled corpora, tokenizer, text -> token shards, and datasets."""

from .datasets import Datasets, TokenSequences, build_datasets
from .dummy import DummyTokens
from .text import (
    CORPORA,
    DataError,
    TextData,
    TextSource,
    Tokenizer,
    clean_play,
    corpus_files,
    load_tokenizer,
    prepare_text_data,
    resolve_text_files,
    tokenizer_sha256,
    train_tokenizer,
)

__all__ = [
    "CORPORA",
    "DataError",
    "Datasets",
    "DummyTokens",
    "TextData",
    "TextSource",
    "TokenSequences",
    "Tokenizer",
    "build_datasets",
    "clean_play",
    "corpus_files",
    "load_tokenizer",
    "prepare_text_data",
    "resolve_text_files",
    "tokenizer_sha256",
    "train_tokenizer",
]
