# SPDX-License-Identifier: MIT
"""Every held-out figure of a run reads the same windows, spread evenly over the held-out split."""

import json
import logging
import os

import numpy as np
import torch

from stackwise.data.activations import _manifest_digest, load_shard, read_manifest
from stackwise.data.datasets import build_datasets
from stackwise.engine.baselines import _eval_ids
from stackwise.engine.evaluate import eval_policy, heldout_rows
from stackwise.engine.rundir import RunDir, ensure_views
from stackwise.model import StackWiseLM


def test_rows_spread_over_the_split():
    rows = heldout_rows(825, 64)
    assert len(rows) == len(set(rows)) == 64 and rows == sorted(rows)
    assert rows[0] == 0 and rows[-1] >= 825 - 825 // 64 - 1  # reaches the split's end, not only its start
    assert max(b - a for a, b in zip(rows, rows[1:])) <= -(-825 // 64)
    assert heldout_rows(10, 64) == list(range(10))  # a split with fewer windows: all of them
    assert heldout_rows(64, 64) == list(range(64))


class _Recording(torch.utils.data.Dataset):
    def __init__(self, data):
        self.data, self.read = data, []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        self.read.append(i)
        return self.data[i]


def test_views_and_evaluations_read_the_same_rows(make_cfg, tmp_path, caplog):
    cfg = make_cfg("data.dummy=true", "data.dummy_sequences=96", f"train.out_dir={tmp_path}", "train.eval_sequences=5")
    ds = build_datasets(cfg)
    want = heldout_rows(len(ds.val), 5)
    assert len(ds.val) == 12 and want == [0, 2, 4, 7, 9]
    run = RunDir(cfg)
    ensure_views(cfg, run)
    man = read_manifest(run.views("val"), what="held-out views")
    assert man["heldout_rows"] == "spread" and man["sequences"] == 5
    targets = np.concatenate([load_shard(run.views("val"), man, i)["targets"] for i in range(len(man["shards"]))])
    lm = np.concatenate([load_shard(run.views("val"), man, i)["loss_mask"] for i in range(len(man["shards"]))])
    for k, r in enumerate(want):  # the views' targets are those rows' tokens where a loss is taken
        seq = ds.val[r].numpy()
        assert (targets[k][lm[k] > 0] == seq[lm[k] > 0]).all()
        assert lm[k].any()

    rec = _Recording(ds.val)
    kw = dict(mask_id=cfg.model.mask_id, vocab_size=cfg.model.vocab_size, mask_fraction_min=0.15,
              mask_fraction_max=0.9, mlm_rate=0.15)
    eval_policy(StackWiseLM(cfg.model), rec, "clm", batch_size=2, limit=5, seed=0, device="cpu", mask_kw=kw)
    assert rec.read == want
    rec = _Recording(ds.val)
    ids = _eval_ids(rec, cfg)  # the unigram baseline's and bytes per token's tokens
    assert rec.read == want and ids.size == 5 * cfg.data.seq_len

    # a run whose held-out views predate the spread rows is kept, with one warning naming the fix
    path = os.path.join(run.views("val"), "manifest.json")
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    old.pop("heldout_rows")
    old["manifest_sha256"] = _manifest_digest(old)  # a valid manifest of the old kind, not a damaged one
    with open(path, "w", encoding="utf-8") as f:
        json.dump(old, f)
    with caplog.at_level(logging.WARNING, logger="stackwise"):
        ensure_views(cfg, run)
    assert any("first train.eval_sequences windows" in r.getMessage() and str(tmp_path) in r.getMessage()
               for r in caplog.records)


def test_suffix_share_masks_training_views_only(make_cfg, tmp_path):
    """objective.suffix_mask_share=1: every training view is masked on a suffix; the held-out views stay uniform
    (the masks the run without it would draw, bit for bit), so runs with and without it are measured alike."""
    def views(run, split):
        man = read_manifest(run.views(split), what=split)
        return man, np.concatenate([load_shard(run.views(split), man, i)["loss_mask"]
                                    for i in range(len(man["shards"]))]).astype(bool)

    base = ["data.dummy=true", "data.dummy_sequences=48", "train.eval_sequences=6"]
    plain = RunDir(make_cfg(*base, f"train.out_dir={tmp_path / 'plain'}"))
    ensure_views(plain.cfg, plain)
    cfg = make_cfg(*base, f"train.out_dir={tmp_path / 'suffix'}", "objective.suffix_mask_share=1.0")
    run = RunDir(cfg)
    ensure_views(cfg, run)
    man, lm = views(run, "train")
    T = lm.shape[1]
    n = lm.sum(1)
    assert man["suffix_share"] == 1.0 and len(lm) == 48 * cfg.objective.mask_draws
    assert (lm == (np.arange(T)[None] >= (T - n)[:, None])).all()
    man_v, lm_v = views(run, "val")
    assert "suffix_share" not in man_v and np.array_equal(lm_v, views(plain, "val")[1])
    assert not (lm_v == (np.arange(T)[None] >= (T - lm_v.sum(1))[:, None])).all(1).all()
