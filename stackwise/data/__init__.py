# SPDX-License-Identifier: MIT
"""Data: dummy token data, bundled corpora and user files (text/JSONL, compressed), tokenizer, streamed token shards,
datasets; the activation store (activations) and its streaming reader (stream) are imported by module."""

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
