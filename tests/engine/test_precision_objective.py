# SPDX-License-Identifier: MIT
"""train.dtype on the single backend, the objective in stages and fine-tuning, and stage_zero_init with frozen weights."""

import json
import os

import torch

from stackwise.engine import checkpoint as ckpt
from stackwise.engine.finetune import fine_tune
from stackwise.engine.fuse import fuse
from stackwise.engine.rundir import RunDir
from stackwise.engine.stages import train_all, train_stage

from stackwise.config import config_from_dict

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


def _train_losses(root):
    with open(os.path.join(root, "metrics.jsonl"), encoding="utf-8") as f:
        return [r["loss"] for r in map(json.loads, f) if r.get("kind") == "train"]


def test_bfloat16_is_used_and_checkpoints_stay_float32(tmp_path):
    fp32 = make(tmp_path / "a")
    bf16 = make(tmp_path / "b", "train.dtype=bfloat16")
    train_stage(fp32, 0)
    train_stage(bf16, 0)
    a, b = _train_losses(fp32.train.out_dir), _train_losses(bf16.train.out_dir)
    assert len(a) == len(b) == 3
    assert a != b, "train.dtype=bfloat16 must change the loss trajectory (autocast is on)"
    assert all(abs(x - y) < 0.1 for x, y in zip(a, b)), f"bf16 should track fp32 closely: {a} vs {b}"
    tensors, _ = ckpt.load_tensors(RunDir(bf16).layer_ckpt(0))
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float32}


def test_activation_checkpointing_on_single_gives_the_same_stage(tmp_path):
    plain = make(tmp_path / "a")
    ckp = make(tmp_path / "b", "engine.activation_checkpointing=true")
    train_stage(plain, 0)
    train_stage(ckp, 0)
    a, _ = ckpt.load_tensors(RunDir(plain).layer_ckpt(0))
    b, _ = ckpt.load_tensors(RunDir(ckp).layer_ckpt(0))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_layerwise_training_honours_causal_attention_mode(tmp_path):
    cfg = make(tmp_path, "model.attention.attention_mode=causal")
    train_stage(cfg, 0)
    from stackwise.model import StackWiseLM

    model = StackWiseLM(cfg.model, layers=[0])
    tensors, _ = ckpt.load_tensors(RunDir(cfg).layer_ckpt(0))
    ckpt.load_into(model, tensors, "layer 0", strict=False)
    ids = torch.randint(0, 60, (1, 16))
    changed = ids.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 60
    # the stage's own forward (what it trained and cached with) must not see the future in causal mode
    from stackwise.engine.stage_io import stage_objective
    from stackwise.engine.stage_module import StageModule

    unit = StageModule(model, [0], stage_objective(cfg))
    la, lb = unit.logits(ids), unit.logits(changed)
    torch.testing.assert_close(la[:, :10], lb[:, :10])
    assert not torch.allclose(la[:, 10:], lb[:, 10:])


def test_stage_zero_init_leaves_frozen_projections_alone_and_fuses(tmp_path):
    cfg = make(tmp_path, "train.stage_zero_init=true", "model.frozen_mlp=[gate,up,down]")
    train_all(cfg)
    fuse(cfg)  # checks the fused model against the cached outputs: a zeroed frozen projection fails here
    tensors, _ = ckpt.load_tensors(RunDir(cfg).layer_ckpt(1))
    assert not any(k.startswith("layers.1.mlp.down") for k in tensors), "frozen seeded weights are not stored"


def test_diffusion_fine_tune_honours_loss_weighting(tmp_path):
    cfg = make(tmp_path)
    train_all(cfg)
    fuse(cfg)
    plain = fine_tune(cfg, "diffusion")
    weighted = fine_tune(make(tmp_path, "objective.loss_weighting=inv_t"), "diffusion")
    assert plain["val_loss"] != weighted["val_loss"], "objective.loss_weighting must change diffusion fine-tuning"


def test_missing_cache_is_rebuilt_from_the_checkpoints(tmp_path):
    cfg = make(tmp_path, "model.n_layers=3", "engine.cache_keep=last", "train.max_steps=6", "train.stage_overlap=false")
    train_all(cfg)
    run = RunDir(cfg)
    assert not run.has_acts(1) and run.has_acts(2), "cache_keep=last keeps only the last layer's cache"
    first, _ = ckpt.load_tensors(run.layer_ckpt(2))
    os.remove(run.layer_ckpt(2))
    train_stage(cfg, 2)  # needs layer 1's cache: rebuilt from layers 0 and 1, then the stage trains as before
    again, _ = ckpt.load_tensors(run.layer_ckpt(2))
    for k in first:
        assert torch.equal(first[k], again[k]), f"{k} differs after training on a rebuilt cache"
    os.remove(run.layer_ckpt(2))
    os.remove(run.layer_ckpt(0))
    import pytest

    with pytest.raises(FileNotFoundError, match=r"layer 1.s activation cache .* cannot be rebuilt: .*layer_0.safetensors .*--layer 0"):
        train_stage(cfg, 2)
