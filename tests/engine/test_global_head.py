# SPDX-License-Identifier: MIT
"""train.global_head (issue 13, SegProp-style trainable top) and train.stage_data=continue."""

import pytest
import torch

from stackwise.config import ConfigError


def test_global_head_validates(make_cfg):
    with pytest.raises(ConfigError, match="train.global_head"):
        make_cfg("train.global_head=-1")
    with pytest.raises(ConfigError, match="train.global_head_fusion"):
        make_cfg("train.global_head_fusion=maybe")
    with pytest.raises(ConfigError, match="train.stage_data"):
        make_cfg("train.stage_data=fresh")


def _run(make_cfg, tmp_path, *extra):
    return make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=3", "engine.device=cpu",
                    "train.checkpoint_interval=0", "train.global_head=1", *extra)


@torch.no_grad()
def _staged_logits(cfg, run, ids):
    """Logits of the staged pipeline: layers 0..n-1 from their files, then the last file's global head and head."""
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine.recipes import stage_model_config, top_layers
    from stackwise.model import StackWiseLM

    n = cfg.model.n_layers
    model = StackWiseLM(stage_model_config(cfg))
    for k in range(n):
        ckpt.load_into(model, ckpt.load_tensors(run.layer_ckpt(k))[0], run.layer_ckpt(k), strict=False)
    h = model.run_layers(model.embed(ids), 0, n, "bidirectional")
    top = top_layers(cfg)
    return model.head(model.run_layers(h, top[0], top[-1] + 1, "bidirectional"))


def test_global_head_carried_trained_and_kept(make_cfg, tmp_path):
    """Every stage starts from the previous stage's global head, trains it, and stores it with the head; keep
    fusion gives an (n + 1)-layer model whose logits equal the staged pipeline's."""
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine import fuse, train_stage
    from stackwise.engine.rundir import RunDir
    from stackwise.engine.stage_model import stage_model

    cfg = _run(make_cfg, tmp_path, "model.tie_embeddings=false")  # untied: the staged logits are simple to rebuild
    run = RunDir(cfg)
    train_stage(cfg, 0)
    t0 = ckpt.load_tensors(run.layer_ckpt(0))[0]
    top0 = {n: t for n, t in t0.items() if n.startswith("layers.2.")}
    assert top0 and any("attn.o_proj" in n for n in top0) and "output.weight" in t0
    start1 = dict(stage_model(cfg, run, [1]).named_parameters())  # stage 1 starts from stage 0's top
    assert all(torch.equal(start1[n], t) for n, t in top0.items())
    train_stage(cfg, 1)
    t1 = ckpt.load_tensors(run.layer_ckpt(1))[0]
    assert any(not torch.equal(t1[n], t) for n, t in top0.items())  # trained again in stage 1
    path = fuse(cfg)
    model, fcfg = ckpt.load_model(path)
    assert fcfg.model.n_layers == 3
    ids = torch.randint(0, cfg.model.vocab_size - 1, (2, 16))
    torch.testing.assert_close(model(ids, attention_mode="bidirectional"), _staged_logits(cfg, run, ids),
                               rtol=1e-5, atol=1e-5)


def test_global_head_drop(make_cfg, tmp_path):
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine import fuse, train_all

    cfg = _run(make_cfg, tmp_path, "train.global_head_fusion=drop")
    train_all(cfg)
    model, fcfg = ckpt.load_model(fuse(cfg))
    assert fcfg.model.n_layers == cfg.model.n_layers
    assert not any(n.startswith("layers.2.") for n, _ in model.named_parameters())


def test_stage_data_continue_reads_the_next_slice(make_cfg, tmp_path):
    """With stage_data=continue stage 1 reads the batches an end-to-end run reads after stage 0's steps."""
    from stackwise.engine.recipes import stage_data_offset

    cfg = make_cfg("train.stage_data=continue", "train.max_steps=5")
    assert [stage_data_offset(cfg, i) for i in range(2)] == [0, 5]
    cfg = make_cfg("train.stage_data=continue", "train.stage_steps=[7,3]")
    assert [stage_data_offset(cfg, i) for i in range(2)] == [0, 7]
    assert stage_data_offset(make_cfg("train.max_steps=5"), 1) == 0


def test_stage_data_continue_batches_match_end_to_end(make_cfg, tmp_path, monkeypatch):
    """The ids stage 1 trains on are those of end-to-end steps max_steps.. of the same views and seed."""
    from stackwise.data.activations import ShardStream
    from stackwise.engine import stages, train_stage
    from stackwise.engine.rundir import RunDir

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=2", "engine.device=cpu",
                   "train.checkpoint_interval=0", "train.stage_data=continue", "data.dummy_sequences=64")
    seen = []
    real = stages.ShardStream

    class Spy(real):
        def __iter__(self):
            for b in super().__iter__():
                seen.append((self.layer is not None, b["targets"].clone()))
                yield b

    monkeypatch.setattr(stages, "ShardStream", Spy)
    train_stage(cfg, 0)
    train_stage(cfg, 1)
    run = RunDir(cfg)
    e2e = iter(ShardStream(run.views("train"), None, cfg.train.batch_size, seed=cfg.train.seed))
    want = [next(e2e)["targets"] for _ in range(4)]
    stage1 = [t for from_cache, t in seen if from_cache][:2]
    stage0 = [t for from_cache, t in seen if not from_cache][:2]
    assert all(torch.equal(a, b) for a, b in zip(stage0, want[:2]))
    assert len(stage1) == 2 and all(torch.equal(a, b) for a, b in zip(stage1, want[2:]))
