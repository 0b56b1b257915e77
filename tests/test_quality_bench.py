# SPDX-License-Identifier: MIT
"""Smoke test of benchmarks/quality_bench.py at --size micro, and of the phase-2 stage options it measures."""

import dataclasses
import importlib.util
import json
import logging
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


def _eval_mod():
    spec = importlib.util.spec_from_file_location("quality_eval", os.path.join(ROOT, "benchmarks", "quality_eval.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_depth_efficiency_formula():
    qe = _eval_mod()
    d = qe.depth_efficiency(4.0, 5.0, 3.0)  # half of the 2-nat depth gain
    assert d["value"] == pytest.approx(0.5) and d["denominator"] == pytest.approx(2.0) and not d["too_small"]
    assert qe.depth_efficiency(3.0, 5.0, 3.0)["value"] == pytest.approx(1.0)  # as good as e2e_long
    assert qe.depth_efficiency(5.0, 5.0, 3.0)["value"] == pytest.approx(0.0)  # no better than 1 layer
    assert qe.depth_efficiency(2.5, 5.0, 3.0)["value"] == pytest.approx(1.25)  # beats e2e_long
    small = qe.depth_efficiency(4.97, 5.0, 4.95)
    assert small["value"] == pytest.approx(0.6) and small["denominator"] == pytest.approx(0.05)
    assert small["too_small"]
    assert qe.depth_efficiency(4.0, 4.0, 4.0)["value"] is None and qe.depth_efficiency(4.0, 4.0, 4.0)["too_small"]
    # the 1-layer model beat the full-depth one: the ratio means nothing, whatever the size of the gap
    assert qe.depth_efficiency(4.0, 4.0, 4.3)["too_small"]


def test_depth_summary_means_judgeable_seeds_apart():
    qe = _eval_mod()
    loss = {("e2e1_long", 0): 5.0, ("e2e_long", 0): 4.0, ("layerwise", 0): 4.1,
            ("e2e1_long", 1): 4.0, ("e2e_long", 1): 4.3, ("layerwise", 1): 3.9}
    de = qe.depth_summary([{"method": m, "seed": s, "loss_mix": v} for (m, s), v in loss.items()])["layerwise"][
        "depth_efficiency"]
    assert de["too_small_seeds"] == [1] and de["judgeable"]["mean"] == pytest.approx(0.9) and de["judgeable"]["n"] == 1


def test_depth_summary_known_numbers():
    qe = _eval_mod()
    loss = {("e2e1_long", 0): 5.0, ("e2e1_long", 1): 6.0, ("e2e_long", 0): 3.0, ("e2e_long", 1): 4.0,
            ("layerwise", 0): 4.0, ("layerwise", 1): 4.5, ("e2e", 0): 3.5}
    rows = [{"method": m, "seed": s, "loss_mix": v} for (m, s), v in loss.items()]
    summary = qe.depth_summary(rows)
    de = summary["layerwise"]["depth_efficiency"]
    assert [p["value"] for p in de["per_seed"]] == pytest.approx([0.5, 0.75])
    assert de["mean"] == pytest.approx(0.625) and de["std"] == pytest.approx(0.25 / math.sqrt(2))
    assert de["denominator"]["mean"] == pytest.approx(2.0) and de["too_small_to_judge"] is False
    gap = summary["layerwise"]["vs_e2e_long_pct"]
    assert gap["mean"] == pytest.approx((100 / 3 + 12.5) / 2)
    assert summary["e2e_long"]["depth_efficiency"]["mean"] == pytest.approx(1.0)
    assert summary["e2e1_long"]["depth_efficiency"]["mean"] == pytest.approx(0.0)
    # e2e only has seed 0: its ratio uses that seed alone
    assert summary["e2e"]["depth_efficiency"]["mean"] == pytest.approx(0.75)
    assert summary["e2e"]["depth_efficiency"]["std"] is None
    # without e2e1_long there is no depth efficiency, only the e2e_long gap
    no1 = qe.depth_summary([r for r in rows if r["method"] != "e2e1_long"])
    assert "depth_efficiency" not in no1["layerwise"] and "vs_e2e_long_pct" in no1["layerwise"]
    assert qe.depth_summary([r for r in rows if r["method"] in ("e2e", "layerwise")]) == {}


def test_depth_summary_named_baselines():
    """depth_baselines judges methods against other end-to-end rows (the reconstruction-term setting): the same
    numbers as the default names give when those rows are relabelled, and the default names' rows are ignored."""
    qe = _eval_mod()
    loss = {("e2e1_long_recon", 0): 5.0, ("e2e_long_recon", 0): 3.0, ("lw_recon", 0): 4.5,
            ("e2e1_long", 0): 9.0, ("e2e_long", 0): 1.0}
    rows = [{"method": m, "seed": s, "loss_mix": v} for (m, s), v in loss.items()]
    named = qe.depth_summary(rows, baselines=("e2e_long_recon", "e2e1_long_recon"))["lw_recon"]
    assert named["depth_efficiency"]["mean"] == pytest.approx(0.25)
    assert named["vs_e2e_long_pct"]["mean"] == pytest.approx(50.0)
    assert qe.depth_summary(rows)["lw_recon"]["depth_efficiency"]["mean"] == pytest.approx(4.5 / 8)
    _, summary = qe.summarize([dict(r, acc_mix=0.1, elbo=4.0, tokens_per_group=1, flops=1.0, wall_s=1.0, cpu_s=1.0,
                                    peak_mem_mib=1.0, **{f"{k}_r{x}": 1.0 for k in ("loss", "acc")
                                                          for x in qe.RATES}) for r in rows],
                              depth_baselines=("e2e_long_recon", "e2e1_long_recon"))
    assert summary["lw_recon"]["depth_efficiency"]["mean"] == pytest.approx(0.25)
    with pytest.raises(SystemExit):  # a baseline must be an end-to-end method: one argparse error naming it
        _bench()._parse(["--report", "--depth_baselines", "e2e_long", "layerwise"])


def test_quality_bench_micro(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the corpus tokenizer/shards live under data/ (built once, reused)
    out, runs = tmp_path / "out", tmp_path / "runs"
    threads = torch.get_num_threads()
    rows = _bench().main(["--size", "micro", "--seeds", "1", "--no-isolate", "--methods", "e2e", "block2",
                          "layerwise", "e2e_long", "e2e1_long", "--out", str(out), "--runs", str(runs)])
    # in-process units leave the caller's logging and threads as they were (a disabled "stackwise" logger once
    # broke the log checks of tests that ran after this one)
    assert not logging.getLogger("stackwise").disabled and torch.get_num_threads() == threads
    by = {r["method"]: r for r in rows}
    assert set(by) == {"e2e", "block2", "layerwise", "e2e_long", "e2e1_long"}
    # e2e1_long: a 1-layer model on the tokens of all stages of the 2-layer model, like e2e_long
    assert by["e2e1_long"]["n_layers"] == 1 and by["e2e_long"]["n_layers"] == 2
    assert by["e2e1_long"]["tokens_total"] == by["e2e_long"]["tokens_total"] == by["layerwise"]["tokens_total"]
    lines = [x for x in capsys.readouterr().out.splitlines() if x.strip()]
    assert lines[-1].startswith("JSON {\"summary\": ")
    summary = json.loads(lines[-1][len("JSON "):])["summary"]
    assert set(summary) == set(by)
    one, full = by["e2e1_long"]["loss_mix"], by["e2e_long"]["loss_mix"]
    de = summary["layerwise"]["depth_efficiency"]
    assert de["per_seed"][0]["denominator"] == pytest.approx(one - full)
    assert de["mean"] == pytest.approx((one - by["layerwise"]["loss_mix"]) / (one - full))
    assert de["too_small_to_judge"] == (abs(one - full) < 0.1)
    assert set(summary["layerwise"]["vs_e2e_long_pct"]) >= {"mean", "std"}
    run_lines = [json.loads(x[len("JSON "):]) for x in lines[:-1] if x.startswith("JSON ")]
    assert sorted((r["method"], r["seed"]) for r in run_lines) == sorted((m, 0) for m in by)
    assert all(math.isfinite(r["loss_mix"]) for r in run_lines)
    for r in rows:
        for k in ("loss_r0.15", "loss_r0.5", "loss_r0.9", "loss_mix", "acc_mix", "elbo", "clm_ppl", "flops",
                  "wall_s", "cpu_s", "peak_mem_mib"):
            assert math.isfinite(r[k]) and r[k] > 0 or k.startswith("acc"), (r["method"], k, r[k])
        assert r["tokens_per_group"] == 6 * 8 * 32 * (2 if r["method"].endswith("_long") else 1), r
    # a 2-layer model in one block-wise stage is end-to-end training through the stage engine: same views,
    # order, optimizer and schedule must give the same model (the fairness check of the e2e baseline)
    assert by["block2"]["loss_mix"] == pytest.approx(by["e2e"]["loss_mix"], abs=1e-4)
    assert [layer for layer, _ in by["layerwise"]["stage_val_loss"]] == [0, 1]
    assert len(by["layerwise"]["layer_gains"]) == 2
    assert by["layerwise"]["tokens_total"] == 2 * by["e2e"]["tokens_total"]
    lines = (out / "results.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["method"] for x in lines) == sorted(by)
    # each row carries the whole config it ran with (the printed JSON lines leave it out, like the curve)
    saved = {json.loads(x)["method"]: json.loads(x)["config"] for x in lines}
    assert saved["e2e1_long"]["model"]["n_layers"] == 1 and saved["layerwise"]["train"]["stage_overlap"]
    assert all("config" not in r and "curve" not in r for r in run_lines)
    assert (out / "loss_vs_tokens.png").stat().st_size > 0 and (out / "layer_gain.png").stat().st_size > 0
    assert "gap vs e2e %" in (out / "table.md").read_text()


def test_stage_options_validate(make_cfg):
    with pytest.raises(ConfigError, match="train.stage_lr_decay"):
        make_cfg("train.stage_lr_decay=0")
    cfg = make_cfg()
    assert cfg.train.stage_zero_init is False and cfg.train.stage_lr_decay == 1.0


def test_stage_zero_init_starts_at_identity(make_cfg, tmp_path):
    from stackwise.engine import train_stage
    from stackwise.engine.rundir import RunDir
    from stackwise.engine.stage_model import stage_model

    cfg = make_cfg(f"train.out_dir={tmp_path}", "train.max_steps=2", "train.stage_zero_init=true",
                   "engine.device=cpu")
    train_stage(cfg, 0)
    model = stage_model(cfg, RunDir(cfg), [1])
    h = torch.randn(2, 8, cfg.model.d_model)
    assert torch.equal(model.run_layers(h, 1, 2, "bidirectional"), h)
    res = train_stage(cfg, 1)
    assert math.isfinite(res.val_loss)


def test_lw_init_prev_method_config(tmp_path):
    """lw_init_prev is layerwise with train.stage_init_from=previous (copy of layer k-1 before step 0)."""
    bench = _bench()
    cfg = bench.build_cfg("micro", "lw_init_prev", 0, str(tmp_path), "cpu")
    base = bench.build_cfg("micro", "layerwise", 0, str(tmp_path), "cpu")
    assert cfg.train.stage_init_from == "previous" and base.train.stage_init_from == "none"
    assert cfg.train.max_steps == base.train.max_steps and cfg.train.layers_per_stage == 1
    one = bench.build_cfg("micro", "e2e1_long", 0, str(tmp_path), "cpu")
    assert one.model.n_layers == 1 and one.train.max_steps == 2 * base.train.max_steps


def test_fair_baseline_methods_config(tmp_path):
    """e2e_long_ri is e2e_long with the stages' residual init (output projections for a depth of 1); the _recon
    baselines add objective.recon_weight 0.1 and change nothing else."""
    bench = _bench()
    ref = bench.build_cfg("depth", "e2e_long", 0, str(tmp_path), "cpu")
    ri = bench.build_cfg("depth", "e2e_long_ri", 0, str(tmp_path), "cpu")
    assert ref.model.init_depth == 4 and ri.model.init_depth == 1 and ri.model.n_layers == 4
    assert ri.train.max_steps == ref.train.max_steps == 1600
    rec = bench.build_cfg("depth", "e2e_long_recon", 0, str(tmp_path), "cpu")
    one = bench.build_cfg("depth", "e2e1_long_recon", 0, str(tmp_path), "cpu")
    assert rec.objective.recon_weight == one.objective.recon_weight == 0.1 and ref.objective.recon_weight == 0
    assert one.model.n_layers == 1 and one.train.max_steps == rec.train.max_steps == ref.train.max_steps
    assert dataclasses.replace(rec, objective=ref.objective) == ref


def test_session8_recipe_methods_config(tmp_path):
    """lw_default_prev / lw_default_recon_prev are the default stages with train.stage_init_from=previous (and the
    reconstruction term); the _ft one also spends 1/8 of the total on the joint fine-tune; nothing else changes."""
    bench = _bench()
    base = bench.build_cfg("depth8", "layerwise", 0, str(tmp_path), "cpu")
    prev = bench.build_cfg("depth8", "lw_default_prev", 0, str(tmp_path), "cpu")
    rprev = bench.build_cfg("depth8", "lw_default_recon_prev", 0, str(tmp_path), "cpu")
    assert prev.train.stage_init_from == rprev.train.stage_init_from == "previous"
    assert rprev.objective.recon_weight == 0.1 and prev.objective.recon_weight == 0
    assert dataclasses.replace(prev, train=base.train) == base
    assert dataclasses.replace(rprev, objective=base.objective, train=base.train) == base
    assert prev.train.overlap_layers == base.train.overlap_layers == 5 and prev.train.max_steps == 400
    assert bench.ft_steps_of("depth8", "lw_default_recon_prev_ft") == 400
    assert bench.ft_steps_of("depth8", "lw_default_prev") == 0


def test_report_rebuilds_a_row_with_its_size_set_and_overrides(tmp_path):
    """A depth_screen row run with --size_set / --set is costed with them in a report, and the sizes are left as
    they were; an unknown key is one error naming the size's keys."""
    bench = _bench()
    before = dict(bench.SIZES["depth"])
    row = {"size": "depth", "method": "e2e_long", "seed": 0, "size_set": ["total_steps=3200", "lr=1e-3"],
           "overrides": ["objective.recon_weight=0.1"]}
    cfg = bench.row_cfg(row, "cpu")
    assert cfg.train.max_steps == 3200 and cfg.train.lr == 1e-3 and cfg.objective.recon_weight == 0.1
    assert bench.SIZES["depth"] == before and bench.EXTRA_OVERRIDES == []
    plain = bench.row_cfg({"size": "depth", "method": "e2e_long", "seed": 0}, "cpu")
    assert plain.train.max_steps == 1600 and plain.train.lr == 3e-3
    with pytest.raises(ValueError, match="'steps_total' is not a setting of size depth"):
        bench.row_cfg(dict(row, size_set=["steps_total=1"]), "cpu")
    assert bench.SIZES["depth"] == before


def test_report_costs_a_row_with_the_config_it_recorded(tmp_path):
    """A row that carries its config is costed with it, not with today's defaults: a `layerwise` row run when the
    default window was 3 keeps the window of 3's planned peak after the default became 5."""
    bench, qe = _bench(), _eval_mod()
    now = bench.build_cfg("depth8", "layerwise", 0, str(tmp_path), "cpu")
    then = bench.build_cfg("depth8", "lw_win3", 0, str(tmp_path), "cpu")
    assert (now.train.overlap_layers, then.train.overlap_layers) == (5, 3)
    row = {"size": "depth8", "method": "layerwise", "seed": 0, "config": then.to_dict()}
    got = bench.row_cfg(row, "cpu")
    assert got == then
    method = bench.METHODS["layerwise"]
    assert (qe.planned_peak_bytes(got, method, device="cpu")
            < 0.8 * qe.planned_peak_bytes(bench.row_cfg(dict(row, config=None), "cpu"), method, device="cpu"))


def test_stage_flops_and_peak_count_the_overlap_window_once(tmp_path):
    """A stage that trains layers 0..k with the head costs what a (k+1)-layer model trained end to end costs per
    token, so progressive growth (lw_grow1: stage k retrains every layer below) over n layers, caching nothing
    (n_views=0), is the sum of n such models, about (n+1)/2n of e2e_long's FLOPs, and its last stage's planned
    peak is the end-to-end one's, not twice it (the window was counted in the stage plan and again on top until
    session 10); the default's window of 5 at 8 layers holds 6 layers, the window of 3 (lw_win3) 4."""
    from stackwise.plan import plan_end_to_end

    bench, qe = _bench(), _eval_mod()
    grow = bench.build_cfg("depth8", "lw_grow1", 0, str(tmp_path), "cpu")
    n, unit = grow.model.n_layers, grow.train.batch_size * grow.data.seq_len
    kw = dict(dtype=grow.train.dtype, device="cpu")
    k_layers = [qe.replace_cfg(grow, model={"n_layers": k + 1}) for k in range(n)]
    expect = sum(plan_end_to_end(c, keep_frozen_mlp=True, **kw).flops_per_token for c in k_layers)
    got = qe.method_flops(grow, bench.METHODS["lw_grow1"], n_views=0, device="cpu")
    assert got == pytest.approx(expect * grow.train.max_steps * unit, rel=1e-9)
    e2e = bench.build_cfg("depth8", "e2e_long", 0, str(tmp_path), "cpu")
    full = qe.method_flops(e2e, bench.METHODS["e2e_long"], n_views=0, device="cpu")
    assert 0.5 < got / full < 0.65  # (n+1)/2n = 0.5625 for the layers, plus the head every stage trains
    e2e_peak = qe.planned_peak_bytes(e2e, bench.METHODS["e2e_long"], device="cpu")
    grow_peak = qe.planned_peak_bytes(grow, bench.METHODS["lw_grow1"], device="cpu")
    assert grow_peak == pytest.approx(e2e_peak, rel=0.05)
    for method, held in (("layerwise", 6), ("lw_win3", 4)):
        base = bench.build_cfg("depth8", method, 0, str(tmp_path), "cpu")
        part = plan_end_to_end(qe.replace_cfg(base, model={"n_layers": held}), keep_frozen_mlp=True, zero_stage=0,
                               **kw)
        base_peak = qe.planned_peak_bytes(base, bench.METHODS[method], device="cpu")
        assert base_peak == pytest.approx(part.total, rel=0.05) and base_peak < (held + 1) / 8 * e2e_peak, method


def test_in_budget_fine_tune_is_costed(tmp_path):
    """A method whose ft_share spends part of the total on the joint fine-tune after fusion pays for it: its FLOPs
    include the fine-tune's end-to-end steps and its planned peak is at least the end-to-end one."""
    bench, qe = _bench(), _eval_mod()
    ft = bench.build_cfg("depth8", "lw_default_ft", 0, str(tmp_path), "cpu")
    steps = bench.ft_steps_of("depth8", "lw_default_ft")
    assert steps == ft.train.finetune_steps == 400
    stages_only = qe.method_flops(ft, {k: v for k, v in bench.METHODS["lw_default_ft"].items() if k != "ft_share"},
                                  n_views=0, device="cpu")
    e2e_cfg = bench.build_cfg("depth8", "e2e_long", 0, str(tmp_path), "cpu")
    per_step = qe.method_flops(e2e_cfg, bench.METHODS["e2e_long"], n_views=0, device="cpu") / e2e_cfg.train.max_steps
    got = qe.method_flops(ft, bench.METHODS["lw_default_ft"], n_views=0, device="cpu")
    assert got == pytest.approx(stages_only + steps * per_step, rel=1e-9)
    peak = qe.planned_peak_bytes(ft, bench.METHODS["lw_default_ft"], device="cpu")
    assert peak >= qe.planned_peak_bytes(e2e_cfg, bench.METHODS["e2e_long"], device="cpu")
