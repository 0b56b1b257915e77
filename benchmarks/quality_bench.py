# SPDX-License-Identifier: MIT
"""Learning-quality benchmark: does layer-wise training learn as well as end-to-end training? (issue 9)

On the bundled Shakespeare corpus (normal data pipeline, held-out split), with the same architecture,
tokenizer, masked views, data order, optimizer, lr schedule and token budget per trained parameter group
(``train.max_steps`` S steps of ``train.batch_size`` sequences for every layer), it trains, per seed:

- ``e2e``: the whole model jointly (``stackwise.engine.end_to_end.train_end_to_end``), S steps;
- ``e2e_long`` (``--methods``): end-to-end for n_layers * S steps, the total tokens of all layer-wise stages;
- ``e2e1_long`` (``--methods``): a 1-layer model end-to-end for n_layers * S steps (same views, order, optimizer
  and schedule as ``e2e_long``): the floor of the depth-efficiency ratio
  ``(loss(e2e1_long) - loss(method)) / (loss(e2e1_long) - loss(e2e_long))`` (1 = all the depth gain of
  end-to-end training, 0 = none), reported per (method, seed) with its denominator (too small to judge
  under 0.1 nats) when both were run for that seed;
- ``layerwise``: StackWise stages of one layer (``train_all`` on cached activations), S steps each, then fused;
- ``layerwise_ft``: the fused layer-wise model + ``train.finetune_steps`` of joint diffusion fine-tuning;
- ``block2`` / ``block4``: stages of 2 / 4 layers (``block4`` of a 4-layer model is end-to-end through the
  stage engine: it must match ``e2e``, a check of the baseline's fairness);
- phase-2 options (``--methods``): ``lw_zero_init`` (train.stage_zero_init), ``lw_lr_decay``
  (train.stage_lr_decay=0.7), ``lw_frozen_head`` (train.stage_trains_head=false);
- depth recipe (``--methods``, issue 13): ``lw_init_prev`` (train.stage_init_from=previous: a new stage's layer
  starts as a copy of trained layer k-1's stored weights, progressive-stacking style).

Each final model gets the same held-out evaluation (``quality_eval.eval_model``: masked loss / accuracy at
rates 0.15 / 0.5 / 0.9 and at the training mix, the ELBO bound) and the same short CLM fine-tune
(``fine_tune(mode="clm")``, reporting held-out perplexity). Every (method, seed) runs in a fresh process,
so peak memory (CPU: peak RSS, incl. ~0.3 GB of torch; CUDA: max allocated) and CPU time are its own.

Outputs: a table on stdout and in ``table.md``, one JSON line per run (``results.jsonl``; also printed as
``JSON {...}``), last a summary line ``JSON {"summary": {method: {"loss_mix", "gap_pct", "vs_e2e_long_pct":
{"mean", "std"}, "depth_efficiency": {"mean", "std", "denominator", "too_small_to_judge", "per_seed"}, ...}}}``
(the e2e_long / depth entries only where those baselines ran for the seeds), and the plots
``loss_vs_tokens.png`` / ``layer_gain.png`` under ``--out`` (default ``benchmarks/results/quality/<size>``).

    python benchmarks/quality_bench.py                         # CPU default size, 3 seeds
    python benchmarks/quality_bench.py --size gpu --seeds 5    # a larger model on a GPU
    python benchmarks/quality_bench.py --methods e2e layerwise lw_zero_init --seeds 3
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import math
import multiprocessing as mp
import os
import resource
import shutil
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quality_eval as qe  # noqa: E402

# model / data / schedule per size; every size uses the bundled corpus through the normal pipeline
SIZES = {
    "micro": dict(vocab_size=512, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, seq_len=32, batch_size=8,
                  steps=6, finetune_steps=4, clm_steps=4, lr=3e-3, eval_seq=16, log_interval=2),
    # a 512-token BPE: at 2048-4096 tokens a d128 model sat on the unigram plateau for all of 300 steps
    # issue 13: lr 1e-3 with 100 warm-up steps for every method (was 3e-3 / 10), chosen a priori from the training
    # curves: at 3e-3 the 4-layer end-to-end runs sat on the unigram plateau until the cosine had lowered the lr
    # to about 1.5e-3 (400-800 steps of 1,600, seed-dependently), which made the depth-efficiency ratio unjudgeable
    "cpu": dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, seq_len=128,
                batch_size=16, steps=400, finetune_steps=100, clm_steps=50, lr=1e-3, warmup=100, eval_seq=256,
                log_interval=20),
    # issue 13, depth efficiency: the cpu model at a fixed total of 1,600 steps (3,276,800 tokens) for every depth
    # and method, on 12,800 distinct sequences (25,600 views = one pass of the longest run): no run repeats a view,
    # stages read consecutive slices of the one batch order (train.stage_data=continue), so every method reads the
    # same batches in the same order as e2e_long. (At "cpu" e2e_long read the 6,400 views four times and the
    # 4-layer/1-layer gap was 0.025-0.066 nats, too small to judge.)
    "depth": dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=384, seq_len=128,
                  batch_size=16, total_steps=1600, fresh_data=True, finetune_steps=100, clm_steps=50, lr=3e-3,
                  warmup=100, eval_seq=256, log_interval=20),
    # issue 13 at 8 layers, session 6: the depth model at 8 layers with the per-stage budget of the 4-layer runs
    # (400 steps a stage, 3,200 in all): at 1,600 total steps the 8-layer end-to-end baseline beat the 1-layer one
    # on 1 seed of 3 (the depth-efficiency denominator was negative twice). The corpus holds 19,414 sequences of
    # 128 tokens, so the longest runs read 38,828 views for 51,200 rows: 1.3 passes (every method the same order)
    "depth8": dict(vocab_size=512, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, d_ff=384, seq_len=128,
                   batch_size=16, total_steps=3200, fresh_data=True, finetune_steps=100, clm_steps=50, lr=3e-3,
                   warmup=100, eval_seq=256, log_interval=20),
    "gpu": dict(vocab_size=4096, d_model=384, n_layers=8, n_heads=6, n_kv_heads=2, d_ff=1024, seq_len=128,
                batch_size=32, steps=1500, finetune_steps=300, clm_steps=300, lr=2e-3, eval_seq=1024,
                log_interval=25),
}
METHODS = {
    "e2e": {"kind": "e2e"},
    "e2e_long": {"kind": "e2e", "steps_mult": "n_layers"},
    "e2e1_long": {"kind": "e2e", "steps_mult": "n_layers", "model_layers": 1},
    # the default config (issue 13: train.stage_overlap at 1x lr with a window of 5 since session 11, 3 in sessions
    # 6-10, 2 in session 5; stage_residual_init)
    "layerwise": {"kind": "stages", "layers_per_stage": 1},
    "layerwise_ft": {"kind": "stages", "layers_per_stage": 1, "finetune": True, "source": "layerwise"},
    # plain one-layer stages (the default before issue 13) and the earlier options on top of them
    "lw_plain": {"kind": "stages", "layers_per_stage": 1, "overrides": {"train.stage_overlap": False}},
    "block2": {"kind": "stages", "layers_per_stage": 2, "overrides": {"train.stage_overlap": False}},
    "block4": {"kind": "stages", "layers_per_stage": 4, "overrides": {"train.stage_overlap": False}},
    "lw_zero_init": {"kind": "stages", "layers_per_stage": 1,
                     "overrides": {"train.stage_overlap": False, "train.stage_zero_init": True}},
    "lw_lr_decay": {"kind": "stages", "layers_per_stage": 1,
                    "overrides": {"train.stage_overlap": False, "train.stage_lr_decay": 0.7}},
    "lw_frozen_head": {"kind": "stages", "layers_per_stage": 1,
                       "overrides": {"train.stage_overlap": False, "train.stage_trains_head": False}},
}


def _lw(share: float = 0.0, **overrides) -> dict:
    """Plain one-layer stages (train.stage_overlap off unless set) with config overrides; ``share``: stage 0's
    share of the total steps."""
    over = {"train.stage_overlap": False, **overrides}
    if over["train.stage_overlap"]:  # the overlap recipes below were measured with a window of 1 unless they say
        over.setdefault("train.overlap_layers", 1)
    m = {"kind": "stages", "layers_per_stage": 1, "overrides": over}
    return dict(m, stage0_share=share) if share else m


def _default(ft_share: float = 0.0, **overrides) -> dict:
    """The default stages (the config's overlap window: 5 since session 11, 3 when sessions 6-10 ran the
    ``lw_default_*`` rows) with config overrides; ``ft_share``: the share of the total steps spent on the joint
    diffusion fine-tune after fusion."""
    m = dict({"kind": "stages", "layers_per_stage": 1}, **({"overrides": overrides} if overrides else {}))
    return dict(m, ft_share=ft_share) if ft_share else m


# every setting fixed a priori (same 1,600 total steps at the cpu size); nothing chosen on the held-out split
RECIPES = {  # issue 13 depth recipes (benchmarks/depth_screen.py screens one unit at a time)
    "lw_init_prev": _lw(**{"train.stage_init_from": "previous"}),
    "lw_init_mid": _lw(**{"train.stage_init_from": "middle"}),
    # stage 0's share of the total steps (4 layers: [700,300,300,300] / [1000,200,200,200])
    "lw_split_7333": _lw(0.4375),
    "lw_split_10222": _lw(0.625),
    "lw_split_7333_prev": _lw(0.4375, **{"train.stage_init_from": "previous"}),
    # stage k also trains layer k-1 (at 0.5x / 1x the scheduled lr), its input from layer k-2's cache
    "lw_overlap": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 0.5}),
    "lw_overlap1": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 1.0}),
    "lw_overlap_split": _lw(0.625, **{"train.stage_overlap": True, "train.overlap_lr_scale": 0.5}),
    # InfoPro-style local term: also predict the unmasked input tokens, weight 0.1
    "lw_recon": _lw(**{"objective.recon_weight": 0.1}),
    # per-stage mask-rate bands of the cached views
    "lw_depth_time": _lw(**{"objective.stage_mask_schedule": "depth_as_time"}),
    "lw_curriculum": _lw(**{"objective.stage_mask_schedule": "curriculum"}),
    # full masking: rates up to 1.0 (the sampler starts from all masks)
    "lw_full_mask": _lw(**{"objective.mask_fraction_max": 1.0}),
    # SegProp-style trainable global head (train.global_head=1): n-1 stage layers + the global head kept at fusion
    # (n blocks, as many as e2e_long), or n stage layers + the head (n + 1 blocks), or dropped at fusion
    "lw_ghead": dict(_lw(**{"train.global_head": 1}), stage_layers_delta=-1),
    "lw_ghead_plus": _lw(**{"train.global_head": 1}),
    "lw_ghead_drop": _lw(**{"train.global_head": 1, "train.global_head_fusion": "drop"}),
    # the joint diffusion fine-tune after fusion inside the same total (1/8 or 1/4 of the steps), alone and after
    # overlapping stages
    "lw_ft": dict(_lw(), ft_share=0.125),
    "lw_ft25": dict(_lw(), ft_share=0.25),
    "lw_overlap_ft": dict(_lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 0.5}), ft_share=0.125),
    # wider overlap windows: stage k retrains layers k-2..k-1, or every earlier layer (progressive growth: the last
    # stage holds the whole model)
    "lw_overlap2": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 0.5, "train.overlap_layers": 2}),
    "lw_overlap2_1": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 1.0, "train.overlap_layers": 2}),
    "lw_overlap2_split": _lw(0.4375, **{"train.stage_overlap": True, "train.overlap_lr_scale": 0.5,
                                        "train.overlap_layers": 2}),
    # session 6, 8 layers: a window of 3 at 1x (a stage holds 4 layers; each layer trains in 4 stages, not 3)
    "lw_overlap3_1": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 1.0, "train.overlap_layers": 3}),
    # session 6: the unmeasured recipes on top of the default (window 3): the InfoPro-style reconstruction term,
    # depth-as-time mask bands, and 1/8 of the total as the joint diffusion fine-tune after fusion
    "lw_default_recon": _default(**{"objective.recon_weight": 0.1}),
    "lw_default_depth_time": _default(**{"objective.stage_mask_schedule": "depth_as_time"}),
    "lw_default_ft": _default(0.125),
    # session 7, fair-baseline checks: e2e_long with the default stages' residual init (each layer's output
    # projections initialised for a depth of 1, as every stage's new layer is under train.stage_residual_init; the
    # end-to-end model otherwise initialises them for n layers), and every baseline with the reconstruction term
    "e2e_long_ri": {"kind": "e2e", "steps_mult": "n_layers", "overrides": {"model.residual_init_depth": 1}},
    "e2e_long_recon": {"kind": "e2e", "steps_mult": "n_layers", "overrides": {"objective.recon_weight": 0.1}},
    "e2e1_long_recon": {"kind": "e2e", "steps_mult": "n_layers", "model_layers": 1,
                        "overrides": {"objective.recon_weight": 0.1}},
    # session 8, the reconstruction-term setting (where depth efficiency is judgeable on every seed): the default
    # with each new layer started from the previous one (G_stack-style), with and without the term
    "lw_default_recon_prev": _default(**{"objective.recon_weight": 0.1, "train.stage_init_from": "previous"}),
    "lw_default_prev": _default(**{"train.stage_init_from": "previous"}),
    "lw_default_recon_prev_ft": _default(0.125, **{"objective.recon_weight": 0.1, "train.stage_init_from": "previous"}),
    "lw_default_recon_mid": _default(**{"objective.recon_weight": 0.1, "train.stage_init_from": "middle"}),
    "lw_grow1_recon": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 1.0, "train.overlap_layers": 64,
                             "objective.recon_weight": 0.1}),
    "lw_grow": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 0.5, "train.overlap_layers": 64}),
    "lw_grow1": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 1.0, "train.overlap_layers": 64}),
    "lw_overlap_prev": _lw(**{"train.stage_overlap": True, "train.overlap_lr_scale": 0.5,
                              "train.stage_init_from": "previous"}),
    "lw_overlap_ghead": dict(_lw(**{"train.global_head": 1, "train.stage_overlap": True,
                                    "train.overlap_lr_scale": 0.5}), stage_layers_delta=-1),
    # session 10, 8 layers at four times the tokens (where the default's share of end-to-end depth falls to 0.82),
    # beside progressive growth (lw_grow1): the default stages on 3/4 of the total, the joint diffusion fine-tune
    # after fusion on the last 1/4 (it draws fresh masks from the token windows: not an equal-views comparison)
    "lw_default_ft25": _default(0.25),
    # session 11: a wider window that stays bounded (a stage holds 6 layers whatever the depth), measured on every
    # seed after it matched growth at 8 layers, 2x, seed 0; the default since (lw_win5 = layerwise), and the
    # window of 3 that was the default in sessions 6-10 (the `layerwise` rows of those sessions)
    "lw_win5": _default(**{"train.overlap_layers": 5}),
    "lw_win3": _default(**{"train.overlap_layers": 3}),
}
METHODS.update(RECIPES)
DEFAULT_METHODS = ["e2e", "layerwise", "layerwise_ft", "block2", "block4"]


EXTRA_OVERRIDES: list[str] = []  # depth_screen --set: config overrides for every unit of this process


def stage_steps_of(size: str, method: str) -> tuple[int, list[int]]:
    """(train.max_steps, train.stage_steps) of a method at a size.

    Sizes with ``total_steps`` fix the whole run's steps for every depth: a stage of a stage-wise method gets
    total / n_stages steps (``stage0_share``: stage 0 gets that share of the total, the rest split evenly), e2e
    one n_layers-th of the total, e2e_long / e2e1_long all of it. Other sizes give every stage ``steps``.
    """
    s, m = SIZES[size], METHODS[method]
    n_stages = (s["n_layers"] + m.get("stage_layers_delta", 0)) // m.get("layers_per_stage", 1)
    total = s.get("total_steps")
    if not total:
        if m["kind"] == "stages" and m.get("stage0_share") and n_stages > 1:
            return s["steps"], _split(s["steps"] * n_stages, n_stages, m["stage0_share"])
        return s["steps"] * (s["n_layers"] if m.get("steps_mult") else 1), []
    if m["kind"] == "e2e":
        return (total if m.get("steps_mult") else total // s["n_layers"]), []
    total -= ft_steps_of(size, method)  # ft_share: the joint fine-tune's steps come out of the same total
    share = m.get("stage0_share")
    if not share or n_stages == 1:
        return total // n_stages, []
    return total // n_stages, _split(total, n_stages, share)


def ft_steps_of(size: str, method: str) -> int:
    """Steps of the in-budget joint diffusion fine-tune after fusion (``ft_share`` of ``total_steps``; 0: none)."""
    s, m = SIZES[size], METHODS[method]
    return round(m.get("ft_share", 0.0) * s["total_steps"]) if s.get("total_steps") else 0


def _split(total: int, n_stages: int, share: float) -> list[int]:
    rest = (total - round(share * total)) // (n_stages - 1)
    return [total - rest * (n_stages - 1)] + [rest] * (n_stages - 1)


def build_cfg(size: str, method: str, seed: int, out_dir: str, device: str):
    from stackwise.config import config_from_dict

    s, m = SIZES[size], METHODS[method]
    max_steps, split = stage_steps_of(size, method)
    # two masked views per sequence; S * B views are read per stage, about one epoch; fresh_data: one pass of the
    # whole (longest) run, read by the stages one slice each
    n_seq = max(s["batch_size"], (s["total_steps"] if s.get("fresh_data") else s["steps"]) * s["batch_size"] // 2)
    tree = {
        "model": {"vocab_size": s["vocab_size"], "d_model": s["d_model"],
                  # e2e1_long: 1 layer; stage_layers_delta: lw_ghead trains n-1 stage layers under a 1-block top
                  "n_layers": m.get("model_layers", s["n_layers"] + m.get("stage_layers_delta", 0)),
                  "n_heads": s["n_heads"], "n_kv_heads": s["n_kv_heads"], "d_ff": s["d_ff"], "max_seq_len": 1024,
                  "rope_theta": 10000.0, "init_seed": seed,
                  "attention": {"attention_type": "gqa", "backend": "torch" if device == "cpu" else "auto"}},
        "data": {"dummy": False, "corpus": "shakespeare", "seq_len": s["seq_len"], "max_train_sequences": n_seq,
                 "seed": seed},
        "train": {"lr": s["lr"], "batch_size": s["batch_size"], "warmup_steps": s.get("warmup", 10),
                  "log_interval": s["log_interval"], "finetune_steps": s["finetune_steps"], "eval_sequences": 64,
                  "seed": seed, "out_dir": out_dir, "checkpoint_interval": 0,
                  # e2e_long / e2e1_long: as many steps as all layer-wise stages of the full-depth model
                  # together (equal total tokens, same views)
                  "max_steps": max_steps,
                  "layers_per_stage": m.get("layers_per_stage", 1)},
        "engine": {"device": device, "cache_dtype": "float32", "cache_keep": "last"},
    }
    overrides = dict(m.get("overrides", {}))
    if split:
        overrides["train.stage_steps"] = json.dumps(split)
    if ft_steps_of(size, method):
        overrides["train.finetune_steps"] = ft_steps_of(size, method)
    if s.get("fresh_data") and m["kind"] == "stages":
        overrides["train.stage_data"] = "continue"
    over = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in overrides.items()] + EXTRA_OVERRIDES
    return config_from_dict(tree, [o.replace("True", "true").replace("False", "false") for o in over])


def _stage_records(run_dir: str, cfg) -> tuple[list, list]:
    """([(last layer of stage, held-out view loss)], training curve [(tokens, loss)]) from metrics.jsonl."""
    from stackwise.engine.report import read_metrics

    recs = read_metrics(run_dir)
    K, tok = cfg.train.layers_per_stage, cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    stages = {r["stage"]: r for r in recs if r.get("kind") == "stage"}
    val = [(stages[k]["layers"][-1], stages[k]["val_loss"]) for k in sorted(stages)]
    n = cfg.model.n_layers // K
    steps = cfg.train.stage_steps or [cfg.train.max_steps] * n  # train.stage_steps: each stage its own length
    offset = {i * K: sum(steps[:i]) for i in range(n)}
    curve = [((offset[r["stage"]] + r["step"]) * tok, r["loss"]) for r in recs if r.get("kind") == "train"]
    return val, curve


def apply_size_set(size: str, items: list[str]) -> None:
    """``KEY=VALUE`` changes to a size's settings (depth_screen ``--size_set``), each value read as YAML and cast
    to the setting's type ("3e-3" -> 0.003, "3200" -> 3200).

    Raises:
        ValueError: a key the size does not have (names the size's keys).
    """
    for kv in items:
        key, _, val = kv.partition("=")
        if key not in SIZES[size]:
            raise ValueError(f"--size_set {kv}: {key!r} is not a setting of size {size} ({sorted(SIZES[size])})")
        SIZES[size] = dict(SIZES[size], **{key: type(SIZES[size][key])(yaml.safe_load(val))})


def json_line(row: dict) -> str:
    """A unit's printed ``JSON {...}`` line: the row without its curve and config (both stay in results.jsonl)."""
    return "JSON " + json.dumps({k: v for k, v in row.items() if k not in ("curve", "config")})


def row_cfg(row: dict, device: str):
    """The config a results row was trained with (so a report's FLOPs and planned memory are those of the run):
    the whole config the row recorded, or, for rows written before rows carried it (session 11), its size, method
    and seed with the ``size_set`` / ``overrides`` depth_screen recorded, on today's defaults (a `layerwise` row of
    sessions 6-10 ran the window of 3, today's default is 5: report such rows as `lw_win3`)."""
    if row.get("config"):
        from stackwise.config import config_from_dict

        return config_from_dict(row["config"], [f"engine.device={device}"])
    saved_size, saved_over = SIZES[row["size"]], list(EXTRA_OVERRIDES)
    try:
        apply_size_set(row["size"], row.get("size_set") or [])
        EXTRA_OVERRIDES[:] = row.get("overrides") or []
        return build_cfg(row["size"], row["method"], row["seed"], "unused", device)
    finally:
        SIZES[row["size"]], EXTRA_OVERRIDES[:] = saved_size, saved_over


def set_n_layers(size: str, n_layers: int | None) -> None:
    """``--n_layers``: the size's depth (e2e_long / e2e1_long then get n_layers x steps); None keeps the size's."""
    if n_layers:
        if n_layers < 1:
            raise ValueError(f"--n_layers must be >= 1, got {n_layers}")
        SIZES[size] = dict(SIZES[size], n_layers=n_layers)


def _train_stages(cfg) -> str:
    from stackwise.engine import fuse, train_all

    train_all(cfg)
    return fuse(cfg)


def run_unit(spec: dict) -> dict:
    """Train, evaluate and CLM-fine-tune one (method, seed); runs in its own process unless --no-isolate.

    The quiet logger and the thread count are this unit's: put back when it returns, so that an in-process run
    (--no-isolate, the tests) leaves the caller's logging and threads as they were.
    """
    import torch

    log, threads = logging.getLogger("stackwise"), torch.get_num_threads()
    was_disabled = log.disabled
    log.disabled = was_disabled or not spec["verbose"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    try:
        return _run_unit(spec)
    finally:
        log.disabled = was_disabled
        torch.set_num_threads(threads)


def _run_unit(spec: dict) -> dict:
    import torch

    from stackwise.data.datasets import build_datasets
    from stackwise.engine import checkpoint as ckpt
    from stackwise.engine import fine_tune
    from stackwise.engine.end_to_end import train_end_to_end
    from stackwise.engine.rundir import RunDir

    size, method, seed, root, device = spec["size"], spec["method"], spec["seed"], spec["root"], spec["device"]
    set_n_layers(size, spec.get("n_layers"))
    m = METHODS[method]
    out_dir = os.path.join(root, f"{method}-s{seed}")
    shutil.rmtree(out_dir, ignore_errors=True)
    cfg = build_cfg(size, method, seed, out_dir, device)
    tok = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    n_groups = cfg.model.n_layers // cfg.train.layers_per_stage
    row = {"size": size, "method": method, "seed": seed, "steps_per_stage": cfg.train.max_steps,
           "tokens_per_group": cfg.train.max_steps * tok, "n_layers": cfg.model.n_layers,
           "config": cfg.to_dict()}  # what the unit ran with, whatever the defaults become (row_cfg reads it)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0, c0 = time.time(), time.process_time()
    stage_val, curve = [], []
    if m["kind"] == "e2e":
        res = train_end_to_end(cfg)
        final, row["tokens_total"] = res["path"], cfg.train.max_steps * tok
        curve = [(s * tok, v) for s, v in res["history"]]
        row["stage_eval_e2e"] = res["val_loss"]
    elif m.get("source"):
        src_cfg = build_cfg(size, m["source"], seed, os.path.join(root, f"{m['source']}-s{seed}"), device)
        src = RunDir(src_cfg)
        if not os.path.isfile(src.fused):
            _train_stages(src_cfg)
        stage_val, src_curve = _stage_records(src.root, src_cfg)
        os.makedirs(out_dir, exist_ok=True)
        ft_cfg = qe.replace_cfg(cfg, train={"checkpoint": src.fused})
        fine_tune(ft_cfg, "diffusion")
        final = RunDir(cfg).finetuned("diffusion")
        off = src_curve[-1][0] if src_curve else 0
        from stackwise.engine.report import read_metrics

        curve = src_curve + [(off + r["step"] * cfg.train.batch_size * cfg.data.seq_len, r["loss"])
                             for r in read_metrics(out_dir) if r.get("kind") == "finetune"]
        row["tokens_per_group"] += cfg.train.finetune_steps * cfg.train.batch_size * cfg.data.seq_len
        row["tokens_total"] = (sum(cfg.train.stage_steps or [cfg.train.max_steps] * n_groups)
                               + cfg.train.finetune_steps) * tok
        row["source_run"] = src.root
    else:
        final = _train_stages(cfg)
        stage_val, curve = _stage_records(out_dir, cfg)
        row["tokens_total"] = sum(cfg.train.stage_steps or [cfg.train.max_steps] * n_groups) * tok
        if ft_steps_of(size, method):  # ft_share: joint diffusion fine-tune inside the same total
            from stackwise.engine.report import read_metrics

            fine_tune(qe.replace_cfg(cfg, train={"checkpoint": final}), "diffusion")
            final = RunDir(cfg).finetuned("diffusion")
            off = curve[-1][0] if curve else 0
            curve += [(off + r["step"] * tok, r["loss"]) for r in read_metrics(out_dir) if r.get("kind") == "finetune"]
            row["tokens_total"] += cfg.train.finetune_steps * tok
    row["wall_s"], row["cpu_s"] = time.time() - t0, time.process_time() - c0
    if device == "cuda":
        row["peak_mem_mib"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        row["peak_mem_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        row["rss_before_mib"] = rss0
    row["stage_val_loss"] = stage_val
    if stage_val:
        prev = [math.log(cfg.model.vocab_size - 1)] + [v for _, v in stage_val[:-1]]
        row["layer_gains"] = [p - v for p, (_, v) in zip(prev, stage_val)]
    row["curve"] = curve
    model, _ = ckpt.load_model(final, device=device)
    ds = build_datasets(cfg)
    row.update(qe.eval_model(model, ds.val, cfg, device, n_seq=SIZES[size]["eval_seq"]))
    del model
    if not spec.get("no_clm"):
        clm = fine_tune(qe.replace_cfg(cfg, train={"checkpoint": final, "finetune_steps": SIZES[size]["clm_steps"]}),
                        "clm")
        row["clm_ppl"] = clm["val_perplexity"]
    row["eval_s"] = time.time() - t0 - row["wall_s"]
    return row


def _run_wave(specs: list[dict], jobs: int, isolate: bool):
    """Yield each unit's row as soon as it is done (fresh spawned processes, ``jobs`` at a time)."""
    if not isolate:
        yield from map(run_unit, specs)
        return
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as ex:
        for f in cf.as_completed([ex.submit(run_unit, x) for x in specs]):
            yield f.result()


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=sorted(SIZES), default="cpu")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, ...)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=DEFAULT_METHODS)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--out", default="", help="results folder (default benchmarks/results/quality/<size>)")
    p.add_argument("--runs", default="", help="run directories (default runs/quality_bench/<size>)")
    p.add_argument("--append", action="store_true", help="add to an existing results.jsonl (other methods)")
    p.add_argument("--jobs", type=int, default=0, help="units run at once (default: 2 on a CPU of >= 2 cores, else 1)")
    p.add_argument("--report", action="store_true", help="only rebuild table and plots from results.jsonl")
    p.add_argument("--no-isolate", dest="isolate", action="store_false", help="run every unit in this process")
    p.add_argument("--verbose", action="store_true", help="show the engine's log lines")
    p.add_argument("--n_layers", type=int, default=0, help="model depth (default: the size's; e.g. 8)")
    p.add_argument("--no_clm", action="store_true", help="skip the CLM fine-tune (faster screening; no CLM ppl)")
    p.add_argument("--depth_baselines", nargs=2, metavar=("FULL", "ONE"), default=list(qe.DEPTH_BASELINES),
                   choices=[m for m in METHODS if METHODS[m]["kind"] == "e2e"],
                   help="the full-depth and 1-layer end-to-end methods depth efficiency and the 'vs e2e_long' gap "
                        "are judged against (default: e2e_long e2e1_long; e.g. e2e_long_recon e2e1_long_recon)")
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error(f"--seeds must be >= 1, got {a.seeds}")
    if a.n_layers < 0:
        p.error(f"--n_layers must be >= 1 (0 = the size's), got {a.n_layers}")
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    a = _parse(argv)
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    out = a.out or os.path.join("benchmarks", "results", "quality", a.size)
    root = a.runs or os.path.join("runs", "quality_bench", a.size)
    os.makedirs(out, exist_ok=True)
    set_n_layers(a.size, a.n_layers)
    n_layers = SIZES[a.size]["n_layers"]
    methods = [m for m in a.methods if n_layers % METHODS[m].get("layers_per_stage", 1) == 0
               and METHODS[m].get("layers_per_stage", 1) <= n_layers]
    skipped = sorted(set(a.methods) - set(methods))
    if skipped:
        print(f"skipping {skipped}: layers_per_stage does not divide model.n_layers={n_layers} at --size {a.size}")
    rows_path = os.path.join(out, "results.jsonl")
    rows = []
    if (a.append or a.report) and os.path.isfile(rows_path):
        with open(rows_path, encoding="utf-8") as f:
            rows = [r for r in map(json.loads, f) if a.report or r["method"] not in methods]
    t0, c0 = time.time(), time.process_time()
    jobs = a.jobs or (min(2, os.cpu_count() or 1) if device == "cpu" and a.isolate else 1)
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else 0
    specs = [] if a.report else [dict(size=a.size, method=m, seed=s, root=root, device=device, verbose=a.verbose,
                                      threads=threads, n_layers=a.n_layers, no_clm=a.no_clm)
                                 for m in methods for s in range(a.seeds)]
    if not a.report:
        qe.write_jsonl(rows, rows_path)
    # units whose source run (layerwise for layerwise_ft) must exist go in a second wave
    waves = [[x for x in specs if not METHODS[x["method"]].get("source")],
             [x for x in specs if METHODS[x["method"]].get("source")]]
    for wave in waves:
        for row in _run_wave(wave, jobs, a.isolate):
            src = METHODS[row["method"]].get("source")
            base = next((r for r in rows if r["method"] == src and r["seed"] == row["seed"]), None)
            if base is not None:  # fused + fine-tune costs the stages too
                row["cost_note"] = f"wall_s, cpu_s and flops include {src}"
                for k in ("wall_s", "cpu_s"):
                    row[k] += base[k]
            cfg = build_cfg(a.size, row["method"], row["seed"], "unused", device)
            n_views = cfg.objective.mask_draws * cfg.data.max_train_sequences
            row["flops"] = qe.method_flops(cfg, METHODS[row["method"]], n_views=n_views, device=device)
            row["jobs"] = jobs
            rows.append(row)
            with open(rows_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(json_line(row), flush=True)
    if not rows:
        print(f"no results in {rows_path}")
        return rows
    rows.sort(key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))
    for r in rows:
        cfg = row_cfg(r, device) if a.report or "planned_peak_mib" not in r else None
        if a.report:  # FLOPs from the current planner formula (e.g. rows written by depth_screen.py)
            n_views = cfg.objective.mask_draws * cfg.data.max_train_sequences
            r["flops"] = qe.method_flops(cfg, METHODS[r["method"]], n_views=n_views, device=device)
        if "planned_peak_mib" not in r:
            r["planned_peak_mib"] = qe.planned_peak_bytes(cfg, METHODS[r["method"]], device=device) / 2**20
    table, summary = qe.summarize(rows, depth_baselines=tuple(a.depth_baselines))
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_total = time.process_time() - c0 + ru.ru_utime + ru.ru_stime
    footer = "\n(rebuilt from results.jsonl; wall/CPU per run are the runs' own)" if a.report else (
              f"\nsize {a.size}, seeds {a.seeds}, device {device}, torch {torch.__version__}, {jobs} units at once "
              f"x {threads or torch.get_num_threads()} threads: bench wall {time.time() - t0:.0f} s, "
              f"CPU {cpu_total:.0f} s")
    print(table + footer)
    with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n" + footer + "\n")
    for p in qe.plot(rows, out):
        print(f"wrote {p}")
    print("JSON " + json.dumps({"summary": summary}), flush=True)  # last line: machine-readable summary
    return rows


if __name__ == "__main__":
    main()
