# SPDX-License-Identifier: MIT
"""Flip a byte in, truncate, or delete each kind of artifact: detected before use, named, with the fix.

One small text run (tokenizer, token shards, 2 stages, fused and fine-tuned models) is built once; every case
copies it, damages one file and calls the code that reads that file, through ``cli.main_guard`` (the launchers'
error handling: exit status 2, one ``error:`` line). A few cases also run the real launcher in a subprocess.
Token data heals itself (the build is redone and the damaged file named in a warning), and a deleted resume
state or config.yaml is simply rewritten: those outcomes are asserted instead of an error.
"""

import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from stackwise.config import config_from_dict
from stackwise.data.activations import read_manifest
from stackwise.data.datasets import build_datasets
from stackwise.engine import cli
from stackwise.engine.backends import single as single_backend
from stackwise.engine.finetune import fine_tune
from stackwise.engine.fuse import fuse
from stackwise.engine.rundir import RunDir
from stackwise.engine.sample import sample_text
from stackwise.engine.stages import train_all, train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": ROOT}
# relative paths: a copied base directory is the same run (data.* is locked per run directory)
BASE = {
    "model": {"vocab_size": 300, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
              "max_seq_len": 64, "attention": {"attention_type": "gqa", "backend": "torch"}},
    "data": {"dummy": False, "text_files": ["corpus.txt"], "data_dir": "data", "seq_len": 16},
    "objective": {"mask_draws": 1},
    "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 6, "warmup_steps": 2, "log_interval": 3,
              "eval_sequences": 8, "checkpoint_interval": 3, "finetune_steps": 2, "out_dir": "run",
              # plain stages: stage 1 reads layer 0's cache (the default overlap window would read the ids)
              "stage_overlap": False},
    "engine": {"cache_shard_sequences": 16, "cache_rows": "all"},  # every shard exists to be damaged
}
TEXT = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
        "foolishness. The quick brown fox jumps over the lazy dog while the river runs to the sea.\n") * 40


def cfg_of(*overrides):
    return config_from_dict(BASE, list(overrides))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt_base")
    old = os.getcwd()
    os.chdir(root)
    try:
        (root / "corpus.txt").write_text(TEXT)
        cfg = cfg_of()
        train_all(cfg)
        fuse(cfg)
        fine_tune(cfg, "clm")
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def case(base, tmp_path, monkeypatch):
    """A private copy of the base run, as the working directory."""
    d = tmp_path / "case"
    shutil.copytree(base, d)
    monkeypatch.chdir(d)
    return d


def damage(path, how: str) -> None:
    if how == "delete":
        os.remove(path)
        return
    data = bytearray(open(path, "rb").read())
    if how == "flip":
        data[len(data) // 2] ^= 0x5A
    elif how == "truncate":
        data = data[: len(data) // 2]
    else:
        raise ValueError(how)
    with open(path, "wb") as f:
        f.write(bytes(data))


def guarded(fn, capsys) -> str:
    """Run ``fn`` under the launchers' error handler; return its one error line (exit status must be 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.main_guard(fn)()
    err = capsys.readouterr().err.strip()
    # the stackwise logger's progress lines may come first (they go to the current stderr); the error is one line
    lines = [line for line in err.splitlines() if not line.startswith("[stackwise r")]
    assert e.value.code == 2 and "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def retrain_stage1():
    run = RunDir(cfg_of())
    os.remove(run.layer_ckpt(1))
    shutil.rmtree(os.path.dirname(run.acts(1, "val")))
    train_stage(cfg_of(), 1)


HOW = ["flip", "truncate", "delete"]


@pytest.mark.parametrize("how", HOW)
def test_layer_checkpoint(case, capsys, how):
    damage("run/layer_0.safetensors", how)
    err = guarded(lambda: fuse(cfg_of()), capsys)
    assert "run/layer_0.safetensors" in err and ("retrain" in err or "train layer 0" in err), err


@pytest.mark.parametrize("how", HOW)
def test_stage_resume_state(case, capsys, monkeypatch, how):
    run = RunDir(cfg_of())
    os.remove(run.layer_ckpt(1))
    real = single_backend._save_state

    def save_then_crash(*a, **kw):
        real(*a, **kw)
        raise KeyboardInterrupt  # a crash right after the step-3 state is on disk

    monkeypatch.setattr(single_backend, "_save_state", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train_stage(cfg_of(), 1)
    monkeypatch.setattr(single_backend, "_save_state", real)
    damage(run.stage_state(1), how)
    if how == "delete":
        assert train_stage(cfg_of("train.resume=true"), 1).steps == 6  # nothing to resume: starts over
        return
    err = guarded(lambda: train_stage(cfg_of("train.resume=true"), 1), capsys)
    assert "stage_1.state.safetensors" in err and "delete it" in err, err


@pytest.mark.parametrize("rel", ["layer_0/train/shard_00001.h.npy", "layer_0/train/manifest.json",
                                 "views_train/shard_00000.ids.npy", "views_train/manifest.json"])
@pytest.mark.parametrize("how", HOW)
def test_activation_and_view_caches(case, capsys, rel, how):
    path = os.path.join("run/acts", rel)
    damage(path, how)
    if how == "delete" and rel.startswith("layer_0/") and rel.endswith("manifest.json"):
        # an incomplete layer cache is rebuilt from the layer checkpoints (issue 15), then the stage trains on it
        retrain_stage1()
        read_manifest(os.path.dirname(path))
        return
    err = guarded(retrain_stage1, capsys)
    shown = path if not (how == "delete" and rel.endswith("manifest.json")) else os.path.dirname(path)
    assert shown in err and ("rerun the stage" in err or "delete" in err), err


@pytest.mark.parametrize("how", HOW)
def test_fused_model(case, capsys, how):
    damage("run/fused.safetensors", how)
    err = guarded(lambda: fine_tune(cfg_of(), "clm"), capsys)
    assert "run/fused.safetensors" in err and ("fuse" in err or "retrain" in err), err


@pytest.mark.parametrize("how", HOW)
def test_finetuned_model_and_tokenizer(case, capsys, how):
    damage("run/finetuned_clm.safetensors", how)
    if how == "delete":  # falls back to the fused model, as documented
        assert sample_text(cfg_of(), "It was", max_new_tokens=2)[0].endswith("fused.safetensors")
    else:
        err = guarded(lambda: sample_text(cfg_of(), "It was", max_new_tokens=2), capsys)
        assert "run/finetuned_clm.safetensors" in err, err
    shutil.copyfile("run/fused.safetensors", "run/finetuned_clm.safetensors")
    damage("run/tokenizer.json", how)
    err = guarded(lambda: sample_text(cfg_of(), "It was", max_new_tokens=2), capsys)
    assert "run/tokenizer.json" in err, err


@pytest.mark.parametrize("name", ["train.bin", "val.bin", "meta.json", "tokenizer.json"])
@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_token_data_is_rebuilt(case, caplog, name, how):
    # the token data directory is keyed by the absolute text path: this copy builds its own first
    data_dir = build_datasets(cfg_of()).text.data_dir
    data_dir = pathlib.Path(data_dir)
    files = lambda: {k: e["sha256"] for k, e in json.loads((data_dir / "meta.json").read_text())["files"].items()}
    before = files()
    damage(data_dir / name, how)
    with caplog.at_level(logging.INFO, logger="stackwise"):
        ds = build_datasets(cfg_of())
    said = caplog.text
    assert "rebuilding" in said and (name in said or "meta.json" in said or "unreadable" in said), said
    assert files() == before, "the rebuild must reproduce the same token data"
    assert len(ds.train) > 0


@pytest.mark.parametrize("how", ["flip", "truncate"])
def test_run_config(case, capsys, how):
    if how == "flip":
        text = open("run/config.yaml").read().replace("d_model: 32", "d_model: 3\x00")
        open("run/config.yaml", "w").write(text)
        err = guarded(lambda: train_stage(cfg_of(), 1), capsys)
        assert "run/config.yaml" in err, err
        return
    # cut inside the model section: refused by name (unparsable, or disagreeing with the run)
    text = open("run/config.yaml").read()
    open("run/config.yaml", "w").write(text[: text.index("n_heads")])
    err = guarded(lambda: train_stage(cfg_of(), 1), capsys)
    assert "run/config.yaml" in err and ("damaged" in err or "different model config" in err), err


def _launch(*args, cwd):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300)


def test_through_the_launchers(case):
    """The real launchers: exit status 2, one error line naming the file, no traceback."""
    from stackwise.config import save_config

    save_config(cfg_of(), "c.yaml")
    damage("run/layer_1.safetensors", "flip")
    damage("run/acts/layer_0/train/shard_00000.h.npy", "truncate")
    checks = [(os.path.join(ROOT, "launchers/fuse.py"), "run/layer_1.safetensors"),
              (os.path.join(ROOT, "launchers/fine_tune.py"), "run/fused.safetensors")]
    damage("run/fused.safetensors", "truncate")
    for launcher, name in checks:
        p = _launch(launcher, "--config", "c.yaml", cwd=case)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and name in last, p.stderr[-2000:]
