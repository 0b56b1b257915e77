# SPDX-License-Identifier: MIT
"""Checkpoints record the tokenizer's hash; a different tokenizer (same size, other vocab) is refused on load."""

import json
import os

import pytest

pytest.importorskip("tokenizers")

from safetensors import safe_open  # noqa: E402

from stackwise.config import config_from_dict  # noqa: E402
from stackwise.data.text import tokenizer_sha256, train_tokenizer  # noqa: E402
from stackwise.engine import checkpoint as ckpt  # noqa: E402
from stackwise.engine.sample import sample_text  # noqa: E402
from stackwise.model import StackWiseLM  # noqa: E402

VOCAB = 300
TEXT = ["the river ran down from the hills past the old mill and the miller's daughter watched it " * 20]


def _cfg(tmp_path, dummy=False):
    base = {"model": {"vocab_size": VOCAB, "d_model": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                      "max_seq_len": 64, "attention": {"backend": "torch"}},
            "data": {"dummy": dummy, "seq_len": 16},
            "train": {"out_dir": str(tmp_path / "run")}}
    if not dummy:
        base["data"]["text_files"] = [str(tmp_path / "t.txt")]
    return config_from_dict(base)


def _run(tmp_path, dummy=False):
    """A run directory holding tokenizer.json (text runs) and a fused checkpoint written with save_model."""
    cfg = _cfg(tmp_path, dummy)
    os.makedirs(cfg.train.out_dir)
    if not dummy:
        tok = train_tokenizer(TEXT, VOCAB, os.path.join(cfg.train.out_dir, "tokenizer.json"))
        assert tok.vocab_size == VOCAB and tok.mask_id == VOCAB - 1
    path = os.path.join(cfg.train.out_dir, "fused.safetensors")
    ckpt.save_model(path, StackWiseLM(cfg.model), cfg, {"kind": "fused"})
    return cfg, path


def _meta(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata()


def _edit_vocab(path):
    """Swap the ids of two ordinary vocab entries: same size, same mask id, different text per id."""
    obj = json.load(open(path, encoding="utf-8"))
    vocab = obj["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[65:67]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    json.dump(obj, open(path, "w", encoding="utf-8"))


def _edit_merges(path):
    obj = json.load(open(path, encoding="utf-8"))
    merges = obj["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    json.dump(obj, open(path, "w", encoding="utf-8"))


def test_hash_is_canonical(tmp_path):
    p = tmp_path / "tok.json"
    train_tokenizer(TEXT, VOCAB, p)
    h = tokenizer_sha256(p)
    obj = json.load(open(p, encoding="utf-8"))
    json.dump(obj, open(p, "w", encoding="utf-8"), indent=4)  # re-indented: same tokenizer, same hash
    assert tokenizer_sha256(p) == h
    _edit_merges(p)
    assert tokenizer_sha256(p) != h


def test_text_checkpoint_records_hash_and_loads(tmp_path):
    cfg, path = _run(tmp_path)
    meta = _meta(path)
    assert meta[ckpt.TOKENIZER_KEY] == tokenizer_sha256(os.path.join(cfg.train.out_dir, "tokenizer.json"))
    model, mcfg = ckpt.load_model(path)
    assert mcfg.model.vocab_size == VOCAB
    used, text = sample_text(cfg, "the river", max_new_tokens=3)
    assert used == path and text.startswith("the river")


@pytest.mark.parametrize("edit", [_edit_vocab, _edit_merges])
def test_different_tokenizer_refused(tmp_path, edit):
    cfg, path = _run(tmp_path)
    tok = os.path.join(cfg.train.out_dir, "tokenizer.json")
    edit(tok)
    with pytest.raises(ckpt.CheckpointError) as e:
        sample_text(cfg, "the river", max_new_tokens=3)  # generation: the run's tokenizer beside the checkpoint
    msg = str(e.value)
    assert tok in msg and path in msg and "the tokenizer the checkpoint was trained with" in msg
    other = tmp_path / "other.json"
    train_tokenizer(TEXT, VOCAB, other)
    _edit_vocab(other)
    with pytest.raises(ckpt.CheckpointError, match="other.json"):
        ckpt.load_model(path, tokenizer=str(other))  # explicit tokenizer (fine-tuning data)
    with pytest.raises(ckpt.CheckpointError, match="other.json"):
        ckpt.check_tokenizer(path, str(other))


def test_layer_checkpoint_metadata(tmp_path):
    cfg, _ = _run(tmp_path)
    meta = ckpt.config_metadata(cfg)
    assert meta[ckpt.TOKENIZER_KEY] == tokenizer_sha256(os.path.join(cfg.train.out_dir, "tokenizer.json"))


def test_dummy_run_has_no_field_and_loads(tmp_path):
    cfg, path = _run(tmp_path, dummy=True)
    assert ckpt.TOKENIZER_KEY not in _meta(path)
    ckpt.load_model(path)
    used, text = sample_text(cfg, "1 2 3", max_new_tokens=2)
    assert text.startswith("1 2 3")


def test_old_checkpoint_without_field_loads(tmp_path):
    cfg, path = _run(tmp_path)
    tensors, meta = ckpt.load_tensors(path)
    meta.pop(ckpt.TOKENIZER_KEY)
    ckpt.save_tensors(path, tensors, meta)
    _edit_vocab(os.path.join(cfg.train.out_dir, "tokenizer.json"))  # nothing to compare against: no refusal
    ckpt.load_model(path)
    ckpt.check_tokenizer(path, os.path.join(cfg.train.out_dir, "tokenizer.json"))


def test_text_run_checkpoints_all_carry_the_hash(tmp_path):
    """A real (tiny) text run: layer, fused and fine-tuned checkpoints record the run tokenizer's hash."""
    from stackwise.engine.finetune import fine_tune
    from stackwise.engine.fuse import fuse
    from stackwise.engine.rundir import RunDir
    from stackwise.engine.stages import train_all

    text = tmp_path / "corpus.txt"
    text.write_text(("It was the best of times, it was the worst of times, it was the age of wisdom. The quick "
                     "brown fox jumps over the lazy dog while the river runs to the sea.\n") * 60)
    base = {"model": {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                      "max_seq_len": 64, "attention": {"attention_type": "gqa", "backend": "torch"}},
            "data": {"dummy": False, "text_files": [str(text)], "seq_len": 16, "data_dir": str(tmp_path / "data")},
            "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 4, "warmup_steps": 1, "log_interval": 2,
                      "finetune_steps": 2, "eval_sequences": 8, "out_dir": str(tmp_path / "run")},
            "engine": {"cache_shard_sequences": 16}}
    cfg = config_from_dict(base)
    run = RunDir(cfg)
    train_all(cfg)
    fuse(cfg)
    fine_tune(cfg, "clm")
    want = tokenizer_sha256(run.tokenizer)
    for path in (run.layer_ckpt(0), run.layer_ckpt(1), run.fused, run.finetuned("clm")):
        assert _meta(path)[ckpt.TOKENIZER_KEY] == want, path
    sample_text(cfg, "It was the", max_new_tokens=2)
    _edit_merges(run.tokenizer)
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.json"):
        sample_text(cfg, "It was the", max_new_tokens=2)
