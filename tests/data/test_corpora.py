# SPDX-License-Identifier: MIT
"""User corpora at scale: JSONL and compressed files read like plain text, bad records named, and the streamed,
piece-wise parallel encoding gives exactly the ids of encoding every document part whole (the old build)."""

import bz2
import gzip
import json
import lzma

import numpy as np
import pytest

from stackwise.config import ConfigError, DataConfig
from stackwise.data import DataError, prepare_text_data
from stackwise.data import corpora, token_shards
from stackwise.data.corpora import iter_documents, resolve_text_files, split_document
from stackwise.data.tokenizer import _tokenizers

VOCAB = 300
# indentation, tabs, blank-line runs, CRLF, trailing spaces, non-ASCII letters and spaces, digits: the places
# where a careless cut would change GPT-2 pre-tokens
LINES = [
    f"{'    ' * (i % 3)}Line {i}: the quick brown fox{' ' * (i % 2)} jumps over {i * 37 % 101} lazy dogs."
    + ("\t(tab)" if i % 4 == 0 else "") + ("\n" if i % 9 == 0 else "") + (" caf\u00e9\u00a0na\u00efve" if i % 6 == 0 else "")
    for i in range(400)
]
TEXT = "\n".join(LINES) + "\n"


def _tokens(td):
    return np.fromfile(td.train_path, td.dtype), np.fromfile(td.val_path, td.dtype)


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    d = tmp_path_factory.mktemp("plain")
    (d / "a.txt").write_text(TEXT, encoding="utf-8")
    cfg = DataConfig(dummy=False, text_files=[str(d / "a.txt")], data_dir=str(d / "data"), val_fraction=0.1)
    return d, prepare_text_data(cfg, VOCAB)


def _build(tmp_path, name, tokenizer, **kw):
    cfg = DataConfig(dummy=False, text_files=[str(tmp_path / name)], data_dir=str(tmp_path / "data"),
                     val_fraction=0.1, tokenizer=tokenizer, **kw)
    return prepare_text_data(cfg, VOCAB)


@pytest.mark.parametrize("name,write", [
    ("b.txt.gz", lambda p: gzip.open(p, "wt", encoding="utf-8").write(TEXT)),
    ("b.txt.bz2", lambda p: bz2.open(p, "wt", encoding="utf-8").write(TEXT)),
    ("b.txt.xz", lambda p: lzma.open(p, "wt", encoding="utf-8").write(TEXT)),
    ("b.txt.zst", lambda p: p.write_bytes(pytest.importorskip("zstandard").ZstdCompressor().compress(TEXT.encode()))),
    ("b.jsonl", lambda p: p.write_text("".join(json.dumps({"id": i, "body": ln}) + "\n" for i, ln in enumerate(LINES)))),
    ("b.ndjson.gz", lambda p: gzip.open(p, "wt").write("".join(json.dumps({"body": ln}) + "\n\n" for ln in LINES))),
])
def test_jsonl_and_compressed_give_the_plain_text_tokens(plain, tmp_path, name, write):
    _, ref = plain
    write(tmp_path / name)
    td = _build(tmp_path, name, ref.tokenizer_path, jsonl_field="body")
    for got, want in zip(_tokens(td), _tokens(ref)):
        assert len(want) > 100 and np.array_equal(got, want)


def test_document_grouping_matches_plain_text(tmp_path, monkeypatch):
    monkeypatch.setattr(corpora, "_DOC_CHARS", 500)
    (tmp_path / "a.txt").write_text(TEXT)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": ln}) + "\n" for ln in LINES))
    docs = [list(iter_documents(resolve_text_files([str(tmp_path / n)]))) for n in ("a.txt", "a.jsonl")]
    assert len(docs[0]) > 20 and docs[0] == docs[1] and "".join(docs[0]) == TEXT


def test_bad_jsonl_named_by_file_line_and_field(tmp_path, plain):
    tok = plain[1].tokenizer_path
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 3 has no field 'text' \(data\.jsonl_field\); it has "
                                        r"\['body'\]: set data\.jsonl_field"):
        _build(tmp_path, "x.jsonl", tok)
    (tmp_path / "y.jsonl").write_text('{"text": "ok"}\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"y\.jsonl line 2 is not valid JSON .*fix or drop that line"):
        _build(tmp_path, "y.jsonl", tok)
    (tmp_path / "z.jsonl.gz").write_bytes(gzip.compress(b'{"text": 3}\n'))
    with pytest.raises(DataError, match=r"z\.jsonl\.gz line 1 field 'text' \(data\.jsonl_field\) is a int"):
        _build(tmp_path, "z.jsonl.gz", tok)
    (tmp_path / "w.txt.gz").write_bytes(gzip.compress(TEXT.encode())[:-40])
    with pytest.raises(DataError, match=r"w\.txt\.gz could not be read or decompressed \(EOFError.*gzip -t"):
        _build(tmp_path, "w.txt.gz", tok)
    with pytest.raises(ConfigError, match=r"data\.jsonl_field must name the JSONL field.*got ''"):
        DataConfig(dummy=False, text_files=["a.jsonl"], jsonl_field="")


def test_streamed_pieces_equal_whole_part_encoding(tmp_path, monkeypatch):
    """Tiny documents, pieces and batches: the shards still equal encoding each document part whole."""
    monkeypatch.setattr(corpora, "_DOC_CHARS", 3000)
    monkeypatch.setattr(token_shards, "_PIECE_CHARS", 40)
    monkeypatch.setattr(token_shards, "_batch_chars", lambda: 300)
    (tmp_path / "a.txt").write_text(TEXT)
    td = _build(tmp_path, "a.txt", "")
    raw = _tokenizers().Tokenizer.from_file(td.tokenizer_path)
    raw.encode_special_tokens = True
    assert token_shards._cuttable(raw)
    cuts = sum(len(list(token_shards._pieces(p, True))) - 1 for d in iter_documents(resolve_text_files(
        [str(tmp_path / "a.txt")])) for p in split_document(d, 0.1))
    assert cuts > 100  # the build really encoded pieces
    want = {"train": [], "val": []}
    for doc in iter_documents(resolve_text_files([str(tmp_path / "a.txt")])):
        for split, part in zip(want, split_document(doc, 0.1)):
            want[split] += raw.encode(part, add_special_tokens=False).ids
    got = _tokens(td)
    assert np.array_equal(got[0], want["train"]) and np.array_equal(got[1], want["val"])


def test_no_cut_for_other_pre_tokenizers(plain):
    tok = _tokenizers().Tokenizer.from_file(plain[1].tokenizer_path)
    tok.pre_tokenizer = _tokenizers().pre_tokenizers.Whitespace()
    assert not token_shards._cuttable(tok)
    assert list(token_shards._pieces("a\nb\n" * 10**5, False)) == ["a\nb\n" * 10**5]
