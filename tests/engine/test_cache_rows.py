# SPDX-License-Identifier: MIT
"""engine.cache_rows=read (the default): a stage caches only the layer the next stage reads, and only the train
shards of the batches the later stages read; it trains exactly what caching every row trains, and a stage whose
batch order needs other rows rebuilds the cache instead of failing."""

import os

import pytest
import torch

from stackwise.data.activations import ActivationCacheError, ShardStream, read_manifest
from stackwise.engine import checkpoint as ckpt
from stackwise.engine import fuse, train_all, train_stage
from stackwise.engine.distributed import DistEnv
from stackwise.engine.rundir import RunDir
from stackwise.engine.stages import rows_read

# 3 layers, a window of 1, stages reading consecutive slices: 6 steps x 4 rows of 128 views in 16 shards
COMMON = ["model.n_layers=3", "train.stage_overlap=true", "train.overlap_layers=1", "train.stage_data=continue",
          "train.max_steps=6", "train.checkpoint_interval=0", "data.dummy_sequences=64",
          "engine.cache_shard_sequences=8", "engine.device=cpu"]


def _present(run, k, split="train"):
    return {i for i, s in enumerate(read_manifest(run.acts(k, split))["shards"]) if s["files"]}


def test_shards_read_are_the_shards_the_batches_touch(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg(f"train.out_dir={tmp_path}", *COMMON)
    train_stage(cfg, 0)
    views = RunDir(cfg).views("train")
    for world, start, n in ((1, 0, 6), (1, 29, 9), (2, 3, 7)):  # (1, 29, 9) crosses the epoch boundary at 32
        loaded = []  # shards the ranks read for those batches, in all
        for rank in range(world):
            stream = ShardStream(views, None, 4, seed=5, start_step=start, rank=rank, world=world, prefetch=False)
            real = stream._load
            monkeypatch.setattr(stream, "_load", lambda i, real=real: loaded.append(i) or real(i))
            it = iter(stream)
            for _ in range(n):
                next(it)
        planned = stream.shards_read(start, n)
        assert set(loaded) == planned and len(planned) < stream.n_shards, (world, start, n)


def test_stages_cache_only_the_rows_later_stages_read(make_cfg, tmp_path):
    """Stage 0 caches nothing (stage 1 retrains layer 0 from the ids), stage 1 caches layer 0 for stage 2's
    batches, the last stage caches layer 2's held-out outputs only; weights and fused model equal
    engine.cache_rows=all's exactly."""
    read = make_cfg(f"train.out_dir={tmp_path / 'read'}", *COMMON)
    every = make_cfg(f"train.out_dir={tmp_path / 'all'}", *COMMON, "engine.cache_rows=all")
    run = RunDir(read)
    train_stage(read, 0)
    assert not os.path.isdir(os.path.dirname(run.acts(0, "train")))
    train_stage(read, 1)
    want = rows_read(read, run, DistEnv(), 2)
    assert _present(run, 0) == want and 0 < len(want) < 16 and not run.has_acts(1)
    assert _present(run, 0, "val") == set(range(len(read_manifest(run.acts(0, "val"))["shards"])))
    train_stage(read, 2)
    assert _present(run, 2) == set() and run.has_acts(2)
    fuse(read)
    train_all(every)
    fuse(every)
    assert _present(RunDir(every), 2) == set(range(16))
    a, b = ckpt.load_tensors(RunDir(read).fused)[0], ckpt.load_tensors(RunDir(every).fused)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    # a reader that reaches a shard that was not cached is refused with the fix (layer 0's cache under
    # cache_keep=all; the default keep of this config is all too)
    with pytest.raises(ActivationCacheError, match=r"was not cached.*engine.cache_rows=all"):
        for _ in ShardStream(run.views("train"), run.acts(0, "train"), 8, shuffle=False):
            pass


def test_a_stage_reading_other_rows_rebuilds_its_input(make_cfg, tmp_path, caplog):
    """Stage 2 rerun with another batch size reads other shards than stage 1 cached: the cache is rebuilt from the
    layer files (logged) and the stage trains."""
    cfg = make_cfg(f"train.out_dir={tmp_path}", *COMMON, "engine.cache_keep=all")
    train_stage(cfg, 0)
    train_stage(cfg, 1)
    run = RunDir(cfg)
    before = _present(run, 0)
    other = make_cfg(f"train.out_dir={tmp_path}", *COMMON, "engine.cache_keep=all", "train.batch_size=8")
    need = rows_read(other, run, DistEnv(), 2)
    assert need - before, "the test needs a batch order that reads other shards"
    with caplog.at_level("INFO", logger="stackwise"):
        r = train_stage(other, 2)
    assert r.steps == 6 and "lacks" in caplog.text and "rebuilding" in caplog.text
    assert need <= _present(run, 0)
