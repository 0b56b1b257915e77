# SPDX-License-Identifier: MIT
"""End-to-end layer-wise pipeline on CPU: stages -> cache -> fuse -> fine-tune -> generate, plus integrity."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from stackwise.config import config_from_dict
from stackwise.data.activations import ActivationCacheError, ShardStream
from stackwise.engine import checkpoint as ckpt
from stackwise.engine.finetune import fine_tune
from stackwise.engine.fuse import FusionError, fuse
from stackwise.engine.rundir import RunDir
from stackwise.engine.sample import sample_text
from stackwise.engine.stages import train_all, train_stage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASE = {
    "model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
              "max_seq_len": 64, "rope_theta": 10000.0, "attention": {"attention_type": "gqa", "backend": "torch"}},
    "data": {"dummy": True, "dummy_sequences": 48, "seq_len": 16},
    "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 12, "warmup_steps": 2, "log_interval": 4,
              "finetune_steps": 6, "eval_sequences": 8, "checkpoint_interval": 4},
    "engine": {"cache_shard_sequences": 16},
}


def make(tmp_path, *overrides):
    return config_from_dict(BASE, [f"train.out_dir={tmp_path / 'run'}", f"data.data_dir={tmp_path / 'data'}",
                                   *overrides])


def test_full_run_on_dummy_data(tmp_path):
    cfg = make(tmp_path)
    results = train_all(cfg)
    assert [r.layer for r in results] == [0, 1]
    run = RunDir(cfg)
    assert all(os.path.isfile(run.layer_ckpt(k)) for k in (0, 1))
    # the default stages cache only what a later reader needs: stage 1 retrains layer 0 from the ids, so no
    # stage caches layer 0; the last stage caches layer 1 for the fusion check (held-out views only)
    assert run.has_acts(1) and not run.has_acts(0)
    assert not os.path.exists(run.stage_state(0)), "resume state is removed once a stage completes"
    fuse(cfg)
    ft = fine_tune(cfg, "clm")
    assert ft["val_perplexity"] > 1 and np.isfinite(ft["val_loss"])
    for mode in ("mlm", "diffusion"):
        r = fine_tune(cfg, mode)
        assert np.isfinite(r["val_loss"])
    assert r["val_elbo_nats_per_token"] > 0
    _, text = sample_text(cfg, "1 2 3", mode="clm", max_new_tokens=5)
    assert len(text.split()) == 8
    _, text = sample_text(cfg, "1 2 3", mode="diffusion", max_new_tokens=6)
    ids = [int(t) for t in text.split()]
    assert len(ids) == 9 and cfg.model.mask_id not in ids, "the diffusion sampler must fill every mask"
    # a finished stage is skipped on rerun
    again = train_stage(cfg, 1)
    assert again.skipped


def test_full_run_on_real_text(tmp_path):
    text = tmp_path / "corpus.txt"
    para = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
            "foolishness. The quick brown fox jumps over the lazy dog while the river runs to the sea.\n")
    text.write_text(para * 60)
    cfg = make(tmp_path, "data.dummy=false", f"data.text_files=[{text}]", "model.vocab_size=300")
    train_all(cfg)
    fuse(cfg)
    fine_tune(cfg, "clm")
    assert os.path.isfile(RunDir(cfg).tokenizer)
    _, out = sample_text(cfg, "It was the", mode="clm", max_new_tokens=8, temperature=0.0)
    assert out.startswith("It was the") and len(out) > len("It was the")
    _, out = sample_text(cfg, "The quick", mode="diffusion", max_new_tokens=8)
    assert "[MASK]" not in out


def test_corrupt_shard_is_refused_by_name(tmp_path):
    cfg = make(tmp_path, "train.stage_overlap=false")  # plain stages: stage 1 reads layer 0's cache
    train_stage(cfg, 0)
    shard = os.path.join(RunDir(cfg).acts(0, "train"), "shard_00001.h.npy")
    data = bytearray(open(shard, "rb").read())
    data[-7] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(ActivationCacheError, match=r"shard_00001\.h\.npy failed its checksum"):
        train_stage(cfg, 1)
    # an incomplete cache (no manifest) is rebuilt from layer 0's checkpoint, corrupt shard included, then trained on
    os.remove(os.path.join(RunDir(cfg).acts(0, "val"), "manifest.json"))
    r = train_stage(cfg, 1)
    assert r.steps == cfg.train.max_steps and RunDir(cfg).has_acts(0)
    os.remove(RunDir(cfg).layer_ckpt(0))
    os.remove(os.path.join(RunDir(cfg).acts(0, "val"), "manifest.json"))
    with pytest.raises(FileNotFoundError, match=r"layer 0's checkpoint .*layer_0.safetensors is missing"):
        train_stage(cfg, 1)


def test_missing_previous_layer_is_refused(tmp_path):
    cfg = make(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"layer 0's checkpoint .*layer_0.safetensors is missing.*--layer 0"):
        train_stage(cfg, 1)


def test_corrupt_checkpoint_is_refused(tmp_path):
    cfg = make(tmp_path)
    train_stage(cfg, 0)
    path = RunDir(cfg).layer_ckpt(0)
    data = bytearray(open(path, "rb").read())
    data[-3] ^= 0x01
    open(path, "wb").write(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match=r"layer_0.safetensors failed its checksum"):
        train_stage(cfg, 1)
    open(path, "wb").write(bytes(data[:100]))
    with pytest.raises(ckpt.CheckpointError, match=r"layer_0.safetensors is unreadable or corrupt"):
        ckpt.load_tensors(path)


KILL_SCRIPT = """
import os, signal, sys
from stackwise.config import config_from_dict
from stackwise.engine import stages
from stackwise.engine.backends import single
import yaml
cfg = config_from_dict(yaml.safe_load(open(sys.argv[1])))
real = single._save_state
def save_then_die(path, params, opt, step, rng):
    real(path, params, opt, step, rng)
    if step == 8:
        os.kill(os.getpid(), signal.SIGKILL)
single._save_state = save_then_die
stages.train_stage(cfg, int(sys.argv[2]))
"""


@pytest.mark.parametrize("layer", [0, 1])
def test_resume_after_kill_matches_uninterrupted(tmp_path, layer):
    ref_cfg = make(tmp_path / "ref")
    for k in range(layer + 1):
        train_stage(ref_cfg, k)
    ref, _ = ckpt.load_tensors(RunDir(ref_cfg).layer_ckpt(layer))

    cfg = make(tmp_path / "killed")
    for k in range(layer):
        train_stage(cfg, k)
    cfg_path = tmp_path / "killed.yaml"
    from stackwise.config import save_config

    save_config(cfg, cfg_path)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), str(cfg_path), str(layer)], capture_output=True, text=True,
                          env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = RunDir(cfg)
    assert os.path.isfile(run.stage_state(layer)) and not os.path.isfile(run.layer_ckpt(layer))
    resumed_cfg = make(tmp_path / "killed", "train.resume=true")
    train_stage(resumed_cfg, layer)
    got, _ = ckpt.load_tensors(run.layer_ckpt(layer))
    assert got.keys() == ref.keys()
    for name in ref:
        assert torch.equal(got[name], ref[name]), f"{name} differs after resume"


def test_fused_equals_staged_and_tampering_is_caught(tmp_path):
    cfg = make(tmp_path)
    train_all(cfg)
    fuse(cfg)
    model, fcfg = ckpt.load_fused(cfg.train.out_dir)
    run = RunDir(cfg)
    views = next(iter(ShardStream(run.views("val"), None, 4, shuffle=False)))
    cached = next(iter(ShardStream(run.views("val"), run.acts(1, "val"), 4, shuffle=False)))
    with torch.no_grad():
        h = model.run_layers(model.embed(views["x"]), 0, 2, "bidirectional")
        torch.testing.assert_close(h, cached["x"], atol=1e-5, rtol=1e-5)
        last, _ = ckpt.load_tensors(run.layer_ckpt(1))
        staged_logits = torch.nn.functional.linear(model.norm(cached["x"]), last["output.weight"])
        torch.testing.assert_close(model.head(h), staged_logits, atol=1e-4, rtol=1e-4)
    # a layer changed after its cache was written no longer matches
    tensors, meta = ckpt.load_tensors(run.layer_ckpt(1))
    tensors["layers.1.attn.o_proj.weight"] = tensors["layers.1.attn.o_proj.weight"] * 1.5
    ckpt.save_tensors(run.layer_ckpt(1), tensors, {k: v for k, v in meta.items() if k not in ("sha256", "format")})
    with pytest.raises(FusionError, match="differs from the staged outputs"):
        fuse(cfg)


def test_block_wise_stages(tmp_path):
    cfg = make(tmp_path, "model.n_layers=4", "train.layers_per_stage=2")
    results = train_all(cfg)
    assert [r.layer for r in results] == [0, 2]
    fuse(cfg)
    with pytest.raises(ValueError, match="not the first layer of a stage"):
        train_stage(cfg, 1)


def test_run_dir_refuses_other_model(tmp_path):
    train_stage(make(tmp_path), 0)
    with pytest.raises(ValueError, match=r"different model config \(differs in model.d_model"):
        train_stage(make(tmp_path, "model.d_model=64"), 0)


def _launch(*args, cwd=ROOT):
    # the kernel tests set TRITON_INTERPRET=1 for this session; launched runs must not inherit the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env)


def test_launcher_errors_are_one_line(tmp_path):
    cfg_path = os.path.join(ROOT, "configs", "tiny.yaml")
    out = str(tmp_path / "run")
    p = _launch("launchers/train_layer.py", "--config", cfg_path, "--layer", "1", f"--train.out_dir={out}")
    assert p.returncode == 2 and "Traceback" not in p.stderr and "layer_0.safetensors is missing" in p.stderr
    p = _launch("launchers/train_layer.py", "--config", cfg_path, "--model.n_layerz=3")
    assert p.returncode == 2 and "did you mean 'model.n_layers'" in p.stderr
    p = _launch("launchers/train_layer.py", "--config", cfg_path, "--bogus")
    assert p.returncode == 2 and "unrecognized argument '--bogus'" in p.stderr
    p = _launch("launchers/fine_tune.py", "--config", cfg_path, "--mode", "gpt", f"--train.out_dir={out}")
    assert p.returncode == 2 and "objective.fine_tune_mode must be one of" in p.stderr


def test_train_layer_launcher_defaults_to_next_stage(tmp_path):
    cfg_path = os.path.join(ROOT, "configs", "tiny.yaml")
    out = str(tmp_path / "run")
    common = ["--config", cfg_path, f"--train.out_dir={out}", "--max_steps", "4", "--train.finetune_steps=2"]
    assert _launch("launchers/train_layer.py", *common).returncode == 0
    p = _launch("launchers/train_layer.py", *common)
    assert p.returncode == 0 and "stage 1: layers [1]" in p.stderr, p.stderr[-1500:]
    assert _launch("launchers/fuse.py", *common).returncode == 0
    assert _launch("launchers/fine_tune.py", *common, "--mode", "clm").returncode == 0
    p = _launch("launchers/generate.py", *common, "--mode", "clm", "--prompt", "5 6 7", "--max_new_tokens", "4")
    assert p.returncode == 0 and len(p.stdout.strip().splitlines()[-1].split()) == 7, p.stdout + p.stderr[-1000:]
