# SPDX-License-Identifier: MIT
"""Fuzzed configs and launcher arguments: every failure is a ConfigError (or argparse's exit 2) naming a field."""

import json
import os
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackwise.config import ConfigError, StackWiseConfig, config_from_dict, iter_fields
from stackwise.engine import cli

FIELDS = [name for name, *_ in iter_fields()]
SECTIONS = sorted({f.split(".")[0] for f in FIELDS})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.lists(st.integers(-3, 3), max_size=3))
keys = st.one_of(st.sampled_from(FIELDS), st.text(string.ascii_lowercase + "._", min_size=1, max_size=20))


def _nest(items):
    tree = {}
    for key, value in items:
        node = tree
        parts = [p for p in key.split(".") if p] or ["x"]
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return tree


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, scalars), min_size=1, max_size=4))
def test_fuzzed_config_trees(items):
    tree = _nest(items)
    try:
        cfg = config_from_dict(tree)
    except ConfigError as e:
        msg = str(e)
        # the message names a config field or section, or says what is wrong with the whole tree
        assert any(s in msg for s in SECTIONS) or "config" in msg, msg
        return
    assert isinstance(cfg, StackWiseConfig)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.text(string.printable.strip(), max_size=10)), min_size=1,
                max_size=3))
def test_fuzzed_cli_overrides(items):
    overrides = [f"--{k}={v}" for k, v in items]
    try:
        config_from_dict({}, overrides)
    except ConfigError as e:
        assert any(k in str(e) for k, _ in items) or "override" in str(e), str(e)


@settings(max_examples=200, deadline=None)
@given(st.text(string.printable, max_size=200))
def test_fuzzed_yaml_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    from stackwise.config import load_config

    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e) or "config" in str(e)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["--layer", "--config", "--mode", "--max_steps", "--dummy", "--resume", "x", "-1",
                                 "3", "--train.lr=1", "--model.d_model=0", "--bogus", "clm", "--train.lr",
                                 "--local_rank=0", "--attention_mode", "causal"]), max_size=6))
def test_fuzzed_launcher_arguments(argv):
    p = cli.parser("fuzz", layer=True)
    try:
        cli.parse(p, argv)
    except SystemExit as e:
        assert e.code == 2  # argparse usage error: one line, no traceback
    except (ConfigError, FileNotFoundError) as e:
        assert str(e)


def test_every_field_rejects_a_wrong_type():
    """One deliberate wrong-type value per leaf field: the error names that field."""
    for name, tp, default, _ in iter_fields():
        bad = {"int": "seven", "float": "fast", "str": 7, "bool": "maybe", "list[str]": 5, "list[int]": 5}[tp]
        with pytest.raises(ConfigError) as e:
            config_from_dict({}, [f"--{name}={yaml.safe_dump(bad).strip()}" if not isinstance(bad, str)
                                  else f"--{name}={bad}"])
        assert name in str(e.value), (name, str(e.value))


def _stage_cfg(tmp_path, *overrides):
    base = {"model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                      "max_seq_len": 64, "attention": {"backend": "torch"}},
            "data": {"dummy": True, "dummy_sequences": 32, "seq_len": 16}, "objective": {"mask_draws": 1},
            "train": {"batch_size": 8, "max_steps": 8, "log_interval": 4, "checkpoint_interval": 3,
                      "eval_sequences": 8, "out_dir": str(tmp_path / "run")},
            "engine": {"cache_shard_sequences": 16}}
    return config_from_dict(base, list(overrides))


def test_nan_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import math

    import torch

    from stackwise.engine import checkpoint as ckpt
    from stackwise import objective
    from stackwise.engine import stages
    from stackwise.engine.rundir import RunDir

    real, calls = objective.masked_loss, [0]

    def loss_turns_nan(*a, **kw):
        calls[0] += 1
        out = real(*a, **kw)
        return out * float("nan") if calls[0] >= 5 else out

    monkeypatch.setattr(objective, "masked_loss", loss_turns_nan)
    cfg = _stage_cfg(tmp_path)
    # checkpoints at steps 3 and 6, log lines at 4 and 8: step 5 diverges, and the step-6 save must not happen
    with pytest.raises(FloatingPointError, match=r"stage 0: loss became nan at step 6 .*stage_0\.state\.safetensors "
                                                 r"\(step 3\).*--resume"):
        stages.train_stage(cfg, 0)
    tensors, meta = ckpt.load_tensors(RunDir(cfg).stage_state(0))
    assert meta["step"] == "3" and all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert not os.path.exists(RunDir(cfg).layer_ckpt(0)), "a diverged stage must not write its layer"
    monkeypatch.setattr(objective, "masked_loss", real)
    r = stages.train_stage(_stage_cfg(tmp_path, "train.resume=true"), 0)  # fixed: resumes from step 3
    assert math.isfinite(r.train_loss)


def test_nan_in_cached_activations_is_refused(tmp_path):
    import io

    import numpy as np

    from stackwise.data.activations import ActivationCacheError, _manifest_digest, set_entry_digest
    from stackwise.engine.rundir import RunDir
    from stackwise.engine.stages import train_stage

    cfg = _stage_cfg(tmp_path, "train.stage_overlap=false")  # plain stages: stage 1 reads layer 0's cache
    train_stage(cfg, 0)
    d = RunDir(cfg).acts(0, "train")
    m = json.load(open(os.path.join(d, "manifest.json")))
    entry = m["shards"][1]["files"]["h"]
    a = np.load(os.path.join(d, entry["file"]))
    a[0, 3, 5] = np.nan
    buf = io.BytesIO()
    np.save(buf, a)
    open(os.path.join(d, entry["file"]), "wb").write(buf.getvalue())
    # a consistent manifest: only the NaN check can catch it
    set_entry_digest(entry, buf.getvalue())
    m["manifest_sha256"] = _manifest_digest(m)
    json.dump(m, open(os.path.join(d, "manifest.json"), "w"))
    with pytest.raises(ActivationCacheError, match=r"shard_00001\.h\.npy holds NaN/inf.*retrain that stage"):
        train_stage(cfg, 1)


def test_bad_token_data(tmp_path):
    import numpy as np

    from stackwise.data.datasets import TokenSequences, build_datasets
    from stackwise.data.text import DataError

    raw = tmp_path / "ids.bin"
    np.array([1, 2, 3, 70, 4] * 10, dtype=np.uint16).tofile(raw)
    with pytest.raises(DataError, match=r"ids\.bin holds id 70, but ids must be < vocab_size 64"):
        TokenSequences(raw, 4, vocab_size=64, dtype="uint16")
    with pytest.raises(DataError, match=r"data.seq_len \(64\) is longer than .*ids\.bin, which holds 50 tokens"):
        TokenSequences(raw, 64, vocab_size=128, dtype="uint16")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(DataError, match="no text"):
        build_datasets(_stage_cfg(tmp_path, "data.dummy=false", f"data.text_files=[{empty}]", "model.vocab_size=300",
                                  f"data.data_dir={tmp_path / 'd1'}"))
    short = tmp_path / "short.txt"
    short.write_text("a tiny text. " * 20)
    with pytest.raises(DataError, match=r"data.seq_len|fewer than one sequence"):
        build_datasets(_stage_cfg(tmp_path, "data.dummy=false", f"data.text_files=[{short}]", "model.vocab_size=300",
                                  "data.seq_len=512", "model.max_seq_len=512", f"data.data_dir={tmp_path / 'd2'}"))
