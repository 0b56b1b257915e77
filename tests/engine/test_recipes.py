# SPDX-License-Identifier: MIT
"""Depth recipes (issue 13): each option does what it promises before any training step."""

import math

import pytest
import torch

from stackwise.config import ConfigError
from stackwise.engine.recipes import init_sources


def test_stage_init_from_validates(make_cfg):
    with pytest.raises(ConfigError, match="train.stage_init_from"):
        make_cfg("train.stage_init_from=prev")
    with pytest.raises(ConfigError, match="train.stage_init_from"):
        make_cfg("train.stage_init_from=previous", "train.stage_zero_init=true")
    assert make_cfg().train.stage_init_from == "none"


def test_init_sources():
    assert init_sources("none", [3]) == {}
    assert init_sources("previous", [0]) == {}
    assert init_sources("previous", [3]) == {3: 2}
    assert init_sources("previous", [4, 5]) == {4: 2, 5: 3}
    assert init_sources("middle", [1]) == {1: 0}
    assert init_sources("middle", [5]) == {5: 2}  # middle of trained 0..4
    assert init_sources("middle", [6, 7]) == {6: 2, 7: 3}  # middle block of 0..5


@pytest.mark.parametrize("mode", ["previous", "middle"])
def test_stage_init_from_copies_trained_layer(make_cfg, tmp_path, mode):
    """init_from copies layer k-1's (stored, trainable) weights into layer k before step 0; seeded MLP stays own."""
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine import train_stage
    from stackwise.engine.rundir import RunDir
    from stackwise.engine.stage_model import stage_model

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=2", f"train.stage_init_from={mode}",
                   "engine.device=cpu")
    train_stage(cfg, 0)
    trained, _ = ckpt.load_tensors(RunDir(cfg).layer_ckpt(0))
    model = stage_model(cfg, RunDir(cfg), [1])
    own = dict(model.named_parameters())
    names = [n for n in trained if n.startswith("layers.0.")]
    assert names and any("attn" in n for n in names)
    for n in names:
        assert torch.equal(own[n.replace("layers.0.", "layers.1.", 1)], trained[n]), n
    # the frozen seeded projections are the new layer's own draw, not a copy
    from stackwise.model import StackWiseLM

    layer0 = StackWiseLM(cfg.model, layers=[0]).layers[0]
    assert model.layers[1].mlp.frozen
    for n in model.layers[1].mlp.frozen:
        assert not torch.equal(getattr(model.layers[1].mlp, n).weight, getattr(layer0.mlp, n).weight)
    res = train_stage(cfg, 1)
    assert math.isfinite(res.val_loss)


def test_stage_steps_validates(make_cfg):
    with pytest.raises(ConfigError, match="train.stage_steps"):
        make_cfg("train.stage_steps=[3]")  # 2 layers, 1 per stage: 2 entries
    with pytest.raises(ConfigError, match=r"train.stage_steps\[1\]"):
        make_cfg("train.stage_steps=[3,0]")
    assert make_cfg().train.stage_steps == []


def test_stage_steps_gives_each_stage_its_steps(make_cfg, tmp_path):
    """train.stage_steps=[5, 2]: stage 0 runs 5 optimizer steps and stage 1 runs 2, whatever train.max_steps is."""
    from stackwise.engine import train_all
    from stackwise.engine.report import read_metrics

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=3", "train.stage_steps=[5,2]",
                   "train.log_interval=1", "engine.device=cpu")
    res = train_all(cfg)
    assert [r.steps for r in res] == [5, 2]
    steps = {}
    for r in read_metrics(str(tmp_path)):
        if r.get("kind") == "train":
            steps[r["stage"]] = max(steps.get(r["stage"], 0), r["step"])
    assert steps == {0: 5, 1: 2}
