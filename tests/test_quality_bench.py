# SPDX-License-Identifier: MIT
"""Smoke test of benchmarks/quality_bench.py at --size micro, and of the phase-2 stage options it measures."""

import importlib.util
import json
import math
import os

import pytest
import torch

from stackwise.config import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("quality_bench", os.path.join(ROOT, "benchmarks", "quality_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quality_bench_micro(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the corpus tokenizer/shards live under data/ (built once, reused)
    out, runs = tmp_path / "out", tmp_path / "runs"
    rows = _bench().main(["--size", "micro", "--seeds", "1", "--no-isolate", "--methods", "e2e", "block2",
                          "layerwise", "--out", str(out), "--runs", str(runs)])
    by = {r["method"]: r for r in rows}
    assert set(by) == {"e2e", "block2", "layerwise"}
    for r in rows:
        for k in ("loss_r0.15", "loss_r0.5", "loss_r0.9", "loss_mix", "acc_mix", "elbo", "clm_ppl", "flops",
                  "wall_s", "cpu_s", "peak_mem_mib"):
            assert math.isfinite(r[k]) and r[k] > 0 or k.startswith("acc"), (r["method"], k, r[k])
        assert r["tokens_per_group"] == 6 * 8 * 32, r
    # a 2-layer model in one block-wise stage is end-to-end training through the stage engine: same views,
    # order, optimizer and schedule must give the same model (the fairness check of the e2e baseline)
    assert by["block2"]["loss_mix"] == pytest.approx(by["e2e"]["loss_mix"], abs=1e-4)
    assert [layer for layer, _ in by["layerwise"]["stage_val_loss"]] == [0, 1]
    assert len(by["layerwise"]["layer_gains"]) == 2
    assert by["layerwise"]["tokens_total"] == 2 * by["e2e"]["tokens_total"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["method"] for x in lines) == ["block2", "e2e", "layerwise"]
    assert (out / "loss_vs_tokens.png").stat().st_size > 0 and (out / "layer_gain.png").stat().st_size > 0
    assert "gap vs e2e %" in (out / "table.md").read_text()


def test_stage_options_validate(make_cfg):
    with pytest.raises(ConfigError, match="train.stage_lr_decay"):
        make_cfg("train.stage_lr_decay=0")
    cfg = make_cfg()
    assert cfg.train.stage_zero_init is False and cfg.train.stage_lr_decay == 1.0


def test_stage_zero_init_starts_at_identity(make_cfg, tmp_path):
    from stackwise.engine import train_stage
    from stackwise.engine.run import RunDir
    from stackwise.engine.trainer import _stage_model

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=2", "train.stage_zero_init=true",
                   "engine.device=cpu")
    train_stage(cfg, 0)
    model = _stage_model(cfg, RunDir(cfg), [1], "cpu")
    h = torch.randn(2, 8, cfg.model.d_model)
    assert torch.equal(model.run_layers(h, 1, 2, "bidirectional"), h)
    res = train_stage(cfg, 1)
    assert math.isfinite(res.val_loss)
