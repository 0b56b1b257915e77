# SPDX-License-Identifier: MIT
"""train.stage_overlap (issue 13): stage k also trains layer k-1, and every file and cache stays consistent."""

import os

import pytest
import torch

from stackwise.config import ConfigError
from stackwise.engine.recipes import overlap_layers, overlap_lr_scale


def test_overlap_validates(make_cfg):
    with pytest.raises(ConfigError, match="train.overlap_lr_scale"):
        make_cfg("train.stage_overlap=true", "train.overlap_layers=1", "train.overlap_lr_scale=0")
    cfg = make_cfg()
    assert cfg.train.stage_overlap is False
    assert overlap_layers(cfg, [1]) == [1]


def test_overlap_layers_and_lr_scale(make_cfg):
    from stackwise.model import StackWiseLM

    cfg = make_cfg("train.stage_overlap=true", "train.overlap_layers=1", "train.overlap_lr_scale=0.25",
                   "model.n_layers=3")
    assert overlap_layers(cfg, [0]) == [0]
    assert overlap_layers(cfg, [2]) == [1, 2]
    model = StackWiseLM(cfg.model, layers=[1, 2])
    scale = overlap_lr_scale(cfg, [2], model)
    assert scale and all(n.startswith("layers.1.") for n in scale) and set(scale.values()) == {0.25}
    assert overlap_lr_scale(cfg, [0], model) == {}


def test_overlap_optimizer_groups(make_cfg):
    """The backend's optimizer runs layer k-1 at overlap_lr_scale x the scheduled lr, layer k and the head at 1x."""
    from stackwise.engine.backends import param_groups

    cfg = make_cfg("train.stage_overlap=true", "train.overlap_layers=1", "train.overlap_lr_scale=0.25")
    from stackwise.model import StackWiseLM

    model = StackWiseLM(cfg.model, layers=[0, 1])
    trainable = dict(model.named_parameters())
    groups = param_groups(trainable, 0.1, overlap_lr_scale(cfg, [1], model))
    ids = {id(p): n for n, p in trainable.items()}
    for g in groups:
        names = [ids[id(p)] for p in g["params"]]
        if not names:
            continue
        want = 0.25 if names[0].startswith("layers.0.") else 1.0
        assert g.get("lr_scale", 1.0) == want and all(n.startswith("layers.0.") == (want == 0.25) for n in names)


@torch.no_grad()
def _layer_out(cfg, run, upto, ids):
    from stackwise.engine import checkpoint as ckpt
    from stackwise.model import StackWiseLM

    model = StackWiseLM(cfg.model, layers=list(range(upto + 1)))
    for k in range(upto + 1):  # layer k's own weights, and the input embeddings from layer 0's file (the head a
        # later file carries is tied to them, but the cached activations were computed with stage 0's embeddings)
        tensors = ckpt.load_tensors(run.layer_ckpt(k))[0]
        keep = {n: t for n, t in tensors.items()
                if n.startswith(f"layers.{k}.") or (k == 0 and n == "tok_embeddings.weight")}
        ckpt.load_into(model, keep, run.layer_ckpt(k), strict=False)
    return model.run_layers(model.embed(ids), 0, upto + 1, "bidirectional")


def test_overlap_retrains_previous_layer_and_fuses(make_cfg, tmp_path):
    """Stage 2 changes layer 1's file; layer 0 (not in stage 2) is untouched; a stage caches only the next stage's
    input (stage 1: layer 0; stage 2, the last: layer 2), computed by the final weights; cache_keep=last drops
    layer 0's once stage 2 has read it; fusion's exact check passes."""
    from stackwise.data.activations import ShardStream
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine import fuse, train_stage
    from stackwise.engine.rundir import RunDir

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=3", "train.stage_overlap=true",
                   "train.overlap_layers=1", "model.n_layers=3", "engine.device=cpu", "engine.cache_keep=last",
                   "train.checkpoint_interval=0")
    run = RunDir(cfg)
    train_stage(cfg, 0)
    assert not run.has_acts(0)  # stage 1 retrains layer 0 from the ids
    train_stage(cfg, 1)
    assert run.has_acts(0) and not run.has_acts(1)  # stage 2 reads layer 0's outputs; layer 1 it retrains
    before = {k: ckpt.load_tensors(run.layer_ckpt(k))[0] for k in (0, 1)}
    train_stage(cfg, 2)
    after = {k: ckpt.load_tensors(run.layer_ckpt(k))[0] for k in (0, 1)}
    changed = [n for n in after[1] if n.startswith("layers.1.") and not torch.equal(after[1][n], before[1][n])]
    assert changed and any("attn" in n for n in changed)
    assert all(torch.equal(after[0][n], before[0][n]) for n in before[0])
    assert "output.weight" in ckpt.load_tensors(run.layer_ckpt(2))[0]
    assert not os.path.isdir(os.path.dirname(run.acts(0, "val")))  # the cache stage 2 read is dropped
    assert run.has_acts(2) and not run.has_acts(1)
    views = next(iter(ShardStream(run.views("val"), run.acts(2, "val"), 4, shuffle=False)))
    ids = next(iter(ShardStream(run.views("val"), None, 4, shuffle=False)))["x"]
    torch.testing.assert_close(views["x"], _layer_out(cfg, run, 2, ids), rtol=1e-5, atol=1e-5)
    fuse(cfg)  # raises FusionError unless the fused model reproduces the cached outputs of layer 2


def test_overlap_stage1_trains_layer0_from_ids(make_cfg, tmp_path):
    """At stage 1 the overlapped layer is layer 0: its input is the masked ids, and its file/cache are rewritten."""
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine import fuse, train_stage
    from stackwise.engine.rundir import RunDir

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=3", "train.stage_overlap=true",
                   "train.overlap_layers=1", "engine.device=cpu", "train.checkpoint_interval=0",
                   "model.tie_embeddings=false")
    run = RunDir(cfg)
    train_stage(cfg, 0)
    before = ckpt.load_tensors(run.layer_ckpt(0))[0]
    train_stage(cfg, 1)
    after = ckpt.load_tensors(run.layer_ckpt(0))[0]
    assert not torch.equal(after["layers.0.attn.q_proj.weight"], before["layers.0.attn.q_proj.weight"])
    assert not torch.equal(after["tok_embeddings.weight"], before["tok_embeddings.weight"])
    fuse(cfg)


def test_recon_weight_scores_unmasked_tokens(make_cfg):
    """objective.recon_weight=w: loss = (sum of masked CE + w * sum of unmasked CE) / number of masked tokens."""
    import torch.nn.functional as F

    from stackwise.objective import Objective

    with pytest.raises(ConfigError, match="objective.recon_weight"):
        make_cfg("objective.recon_weight=-0.1")
    cfg = make_cfg("objective.recon_weight=0.25")
    obj = Objective.from_config(cfg.objective, cfg.model)
    assert obj.recon_weight == 0.25
    assert Objective.from_config(cfg.objective, cfg.model, "clm").recon_weight == 0.0
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 90, (3, 16), generator=g)
    view = obj.mask(ids, g)
    logits = torch.randn(3, 16, cfg.model.vocab_size, generator=g)
    ce = F.cross_entropy(logits.flatten(0, 1), view["targets"].flatten(), reduction="none").view(3, 16)
    m = view["loss_mask"]
    want = (ce[m].sum() + 0.25 * ce[~m].sum()) / m.sum()
    torch.testing.assert_close(obj.loss(logits, view["targets"], m), want)
    plain = Objective.from_config(make_cfg().objective, cfg.model)
    torch.testing.assert_close(plain.loss(logits, view["targets"], m), ce[m].sum() / m.sum())


def test_full_masking_allowed(make_cfg):
    """objective.mask_fraction_max=1.0 is valid and the diffusion objective then draws fully masked sequences."""
    from stackwise.objective import Objective

    cfg = make_cfg("objective.mask_fraction_min=0.95", "objective.mask_fraction_max=1.0")
    obj = Objective.from_config(cfg.objective, cfg.model)
    view = obj.mask(torch.zeros(64, 40, dtype=torch.long), torch.Generator().manual_seed(1))
    assert float(view["rate"].max()) == 1.0 and bool((view["x"][view["rate"] == 1.0] == cfg.model.mask_id).all())
    with pytest.raises(ConfigError, match="objective.mask_fraction_max"):
        make_cfg("objective.mask_fraction_max=1.01")


def test_stage_mask_bands(make_cfg):
    """depth_as_time: stage 0 the heaviest band, the last the lightest; curriculum widens from the lightest band."""
    from stackwise.engine.recipes import banded_objective, stage_mask_band
    from stackwise.engine.stage_io import stage_objective

    with pytest.raises(ConfigError, match="objective.stage_mask_schedule"):
        make_cfg("objective.stage_mask_schedule=bands")
    assert stage_mask_band("none", 0, 4, 0.1, 0.9) is None
    got = [stage_mask_band("depth_as_time", i, 4, 0.1, 0.9) for i in range(4)]
    for (a, b), (wa, wb) in zip(got, [(0.7, 0.9), (0.5, 0.7), (0.3, 0.5), (0.1, 0.3)]):
        assert a == pytest.approx(wa) and b == pytest.approx(wb)
    assert stage_mask_band("curriculum", 0, 4, 0.1, 0.9) == pytest.approx((0.1, 0.3))
    assert stage_mask_band("curriculum", 3, 4, 0.1, 0.9) == pytest.approx((0.1, 0.9))
    cfg = make_cfg("objective.stage_mask_schedule=depth_as_time")  # 2 layers, 1 per stage
    assert banded_objective(stage_objective(cfg), cfg, 1).band == pytest.approx((0.15, 0.525))
    assert banded_objective(stage_objective(make_cfg()), make_cfg(), 1).band is None


def test_band_supervises_only_in_band_sequences(make_cfg):
    """A banded objective's loss and normaliser count exactly the sequences whose realised rate is in the band."""
    import dataclasses

    import torch.nn.functional as F

    from stackwise.engine.stage_io import stage_objective

    cfg = make_cfg()
    obj = dataclasses.replace(stage_objective(cfg), band=(0.5, 0.9))
    m = torch.zeros(3, 10, dtype=torch.bool)
    m[0, :2] = True  # rate 0.2: out of band
    m[1, :6] = True  # rate 0.6: in
    m[2, :9] = True  # rate 0.9: in (edge)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 10, cfg.model.vocab_size, generator=g)
    targets = torch.randint(0, 90, (3, 10), generator=g)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(3, 10)
    assert obj.in_band(m).tolist() == [False, True, True]
    assert float(obj.normalizer(m)) == 15.0
    torch.testing.assert_close(obj.loss(logits, targets, m), (ce[1, :6].sum() + ce[2, :9].sum()) / 15)


def test_overlap_window_retrains_every_earlier_layer(make_cfg, tmp_path):
    """train.overlap_layers=2: stage 2 of 3 retrains layers 0 and 1 (from the ids); no stage caches them (every
    stage reads the ids), the last caches layer 2, and the fused model reproduces the staged outputs."""
    from stackwise.data.activations import ShardStream
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine import fuse, train_stage
    from stackwise.engine.rundir import RunDir

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=3", "train.stage_overlap=true",
                   "train.overlap_layers=2", "model.n_layers=3", "engine.device=cpu", "engine.cache_keep=last",
                   "train.checkpoint_interval=0", "model.tie_embeddings=false")
    assert overlap_layers(cfg, [2]) == [0, 1, 2] and overlap_layers(cfg, [1]) == [0, 1]
    run = RunDir(cfg)
    train_stage(cfg, 0)
    train_stage(cfg, 1)
    before = {k: ckpt.load_tensors(run.layer_ckpt(k))[0] for k in (0, 1)}
    train_stage(cfg, 2)
    after = {k: ckpt.load_tensors(run.layer_ckpt(k))[0] for k in (0, 1)}
    for k in (0, 1):
        assert not torch.equal(after[k][f"layers.{k}.attn.q_proj.weight"], before[k][f"layers.{k}.attn.q_proj.weight"])
    assert not run.has_acts(0) and not run.has_acts(1) and run.has_acts(2)
    ids = next(iter(ShardStream(run.views("val"), None, 4, shuffle=False)))["x"]
    views = next(iter(ShardStream(run.views("val"), run.acts(2, "val"), 4, shuffle=False)))
    torch.testing.assert_close(views["x"], _layer_out(cfg, run, 2, ids), rtol=1e-5, atol=1e-5)
    fuse(cfg)


def test_default_stages_overlap_a_window_of_five():
    """The default config (issue 13's winner, session 11): stage k retrains layers k-5..k-1 at the full lr, so a
    stage holds at most 6 layers whatever the depth."""
    from stackwise.config import StackWiseConfig, TrainConfig

    t = TrainConfig()
    assert (t.stage_overlap, t.overlap_layers, t.overlap_lr_scale, t.stage_residual_init) == (True, 5, 1.0, True)
    cfg = StackWiseConfig()
    assert overlap_layers(cfg, [7]) == [2, 3, 4, 5, 6, 7] and overlap_layers(cfg, [1]) == [0, 1]
    assert max(len(overlap_layers(cfg, [k])) for k in range(80)) == 6


def test_overlap_stage_rebuilds_its_input_cache(make_cfg, tmp_path):
    """With a window, a rerun stage k needs layer k-w-1's cache (deleted under cache_keep=last): it is rebuilt
    from the checkpoints; a missing overlapped layer's checkpoint is refused by name."""
    from stackwise.engine import train_all, train_stage
    from stackwise.engine.rundir import RunDir

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=2", "train.stage_overlap=true",
                   "train.overlap_layers=1", "model.n_layers=3", "engine.device=cpu", "engine.cache_keep=last",
                   "train.checkpoint_interval=0")
    train_all(cfg)
    run = RunDir(cfg)
    assert not run.has_acts(0)
    os.remove(run.layer_ckpt(2))
    train_stage(cfg, 2)  # reads layer 0's cache: rebuilt
    assert os.path.isfile(run.layer_ckpt(2)) and run.has_acts(2)
    os.remove(run.layer_ckpt(2))
    os.remove(run.layer_ckpt(1))
    with pytest.raises(FileNotFoundError, match=r"layer 1's checkpoint .* stage 2 retrains it"):
        train_stage(cfg, 2)
