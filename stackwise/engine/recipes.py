# SPDX-License-Identifier: MIT
"""Depth recipes for layer-wise stages (issue 13): logic kept out of the trainer so it ports to the new engine.

The trainer calls these through small marked hooks; each recipe is a ``TrainConfig`` field, off by default.

- ``train.stage_init_from`` (``init_new_layers``): a new stage's layers start from trained ones instead of a
  fresh random draw: ``"previous"`` copies the previous stage's layers (layer k-1 into layer k for 1-layer
  stages), ``"middle"`` copies the block at the middle of the trained stack 0..k-1 (progressive / G_stack-style
  growth, cf. Gong et al. 2019 "Efficient training of BERT by progressively stacking"; Du et al. 2024
  "Stacking your Transformers"; MIDAS, Saunshi et al. 2024). Only trainable, stored weights are copied (norms,
  attention projections, MLP down): the frozen seeded MLP projections are regenerated from the new layer's own
  (seed, layer index), so the copied MLP down projection meets different random features -- the attention
  path is a true copy, the MLP a warm start only.
- ``train.stage_steps`` (``stage_config``): the split of the token budget across stages at the same total;
  the trainer runs stage i with ``train.max_steps = stage_steps[i]``.
- ``train.stage_overlap`` (``overlap_layers`` / ``overlap_lr_scale`` / ``load_overlapped`` / ``cache_layer``):
  stage k also trains layer k-1 (at ``train.overlap_lr_scale`` x the scheduled lr), its
  input read from layer k-2's cache (the masked ids when k-1 = 0, and then the input embeddings train with it),
  so the features layer k reads can move towards what layer k needs instead of staying what the head read at
  stage k-1. Layer k-1's file is rewritten; a stage caches only the layer the next stage reads (``cache_layer``:
  k-w for a window of w), which no later stage retrains, so every cached activation is computed by the final
  weights and fusion's check holds unchanged.
- ``objective.stage_mask_schedule`` (``stage_mask_band`` / ``banded_objective``): stage i of n supervises only the
  cached views whose realised mask rate lies in its band of [mask_fraction_min, mask_fraction_max] cut in n equal
  bands: ``depth_as_time`` gives stage 0 the heaviest noise and the last stage the lightest (each block tied to
  its own noise level); ``curriculum`` starts at the lightest band and widens it until the last stage sees every
  rate. Held-out evaluation always scores the full mix.
"""

from __future__ import annotations

import dataclasses

import torch

INIT_FROM = ("none", "previous", "middle")


def init_sources(mode: str, layers: list[int]) -> dict[int, int]:
    """{new layer: trained layer it starts from} for a stage of ``layers`` (consecutive, first > 0)."""
    if mode not in INIT_FROM:
        raise ValueError(f"train.stage_init_from must be one of {list(INIT_FROM)}, got {mode!r}")
    first, k = layers[0], len(layers)
    if mode == "none" or first == 0:
        return {}
    if mode == "previous":
        start = first - k
    else:  # middle of the trained stack 0..first-1, a block of the stage's size
        start = max(0, (first - k) // 2)
    return {j: start + i for i, j in enumerate(layers)}


def init_new_layers(model, layers: list[int], mode: str, load_layer) -> dict[int, int]:
    """Copy trained layers' stored weights into the stage's new layers before step 0; returns the mapping.

    ``load_layer(k)`` returns layer k's stored tensors (names ``layers.{k}.*``; seeded frozen projections are
    not stored and are left as drawn for the new layer).
    """
    sources = init_sources(mode, layers)
    own = dict(model.named_parameters())
    own.update(dict(model.named_buffers()))
    with torch.no_grad():
        for dst, src in sources.items():
            tensors = load_layer(src)
            pre, new = f"layers.{src}.", f"layers.{dst}."
            copied = 0
            for name, t in tensors.items():
                if not name.startswith(pre):
                    continue
                target = own.get(new + name[len(pre):])
                if target is None or target.shape != t.shape:
                    raise ValueError(f"train.stage_init_from={mode!r}: {name} of layer {src} does not fit "
                                     f"{new + name[len(pre):]} of layer {dst}")
                target.copy_(t.to(target.dtype))
                copied += 1
            if not copied:
                raise ValueError(f"train.stage_init_from={mode!r}: the checkpoint of layer {src} holds no "
                                 f"'{pre}*' weights to start layer {dst} from")
    return sources


def stage_config(cfg, layer: int):
    """The config a stage trains with: ``train.max_steps`` is that stage's entry of ``train.stage_steps`` (if set)."""
    steps = cfg.train.stage_steps
    if not steps:
        return cfg
    n = steps[layer // cfg.train.layers_per_stage]
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=n))


def stage_data_offset(cfg, index: int) -> int:
    """Optimizer steps of the stages before stage ``index`` under ``train.stage_data=continue`` (0 for "repeat"):
    that stage's batch stream starts there."""
    t = cfg.train
    if t.stage_data != "continue":
        return 0
    return sum(t.stage_steps[:index]) if t.stage_steps else index * t.max_steps


def top_layers(cfg) -> list[int]:
    """Indices of the ``train.global_head`` blocks: model.n_layers .. n_layers + global_head - 1 (empty when off)."""
    n = cfg.model.n_layers
    return list(range(n, n + cfg.train.global_head))


def stage_model_config(cfg):
    """The model config a stage builds: model.n_layers + train.global_head blocks (the global head last), with
    residual outputs initialised for one stage's depth under train.stage_residual_init (weights that are loaded
    from files are unaffected: this only sets the starting draw of new layers)."""
    m = cfg.model
    if cfg.train.stage_residual_init and not m.residual_init_depth:
        m = dataclasses.replace(m, residual_init_depth=cfg.train.layers_per_stage)
    if cfg.train.global_head:
        m = dataclasses.replace(m, n_layers=m.n_layers + cfg.train.global_head)
    return m


def overlap_layers(cfg, layers: list[int]) -> list[int]:
    """The layers a stage runs and trains: ``layers``, plus the ``train.overlap_layers`` layers before them under
    ``train.stage_overlap`` (as many as exist)."""
    layers = list(layers)
    if not cfg.train.stage_overlap:
        return layers
    start = max(0, layers[0] - cfg.train.overlap_layers)
    return list(range(start, layers[0])) + layers


def overlap_lr_scale(cfg, layers: list[int], model) -> dict[str, float]:
    """{parameter name: train.overlap_lr_scale} for the overlapped (earlier) layers of the stage; empty when off."""
    run = overlap_layers(cfg, layers)
    earlier = run[:len(run) - len(layers)]
    if not earlier:
        return {}
    pres = tuple(f"layers.{k}." for k in earlier)
    names = {n: cfg.train.overlap_lr_scale for n, _ in model.named_parameters() if n.startswith(pres)}
    if earlier[0] == 0 and not cfg.model.tie_embeddings:
        names["tok_embeddings.weight"] = cfg.train.overlap_lr_scale  # the input embeddings belong to layer 0's file
    return names


def load_overlapped(model, cfg, load_layer, layers: list[int]) -> None:
    """Load the overlapped layers' trained weights (and the input embeddings when layer 0 is one) into ``model``."""
    run = overlap_layers(cfg, layers)
    own = dict(model.named_parameters())
    for k in run[:len(run) - len(layers)]:
        tensors = load_layer(k)
        with torch.no_grad():
            for name, t in tensors.items():
                embed = name == "tok_embeddings.weight" and not cfg.model.tie_embeddings
                if name.startswith(f"layers.{k}.") or embed:
                    if name not in own:  # a frozen seeded projection is not stored; anything else must fit
                        raise ValueError(f"train.stage_overlap: {name} of layer {k}'s file has no place in the stage")
                    own[name].copy_(t.to(own[name].dtype))


def cache_layer(cfg, first: int) -> int:
    """The layer whose outputs the stage starting at ``first`` caches: the next stage's input (the layer before the
    first one it runs, so under ``train.stage_overlap`` the lowest layer this stage trains for the last time), the
    last layer for the last stage (fusion's check reads it), or -1 when the next stage reads the masked ids."""
    K, n = cfg.train.layers_per_stage, cfg.model.n_layers
    nxt = first + K
    if nxt >= n:
        return n - 1
    return overlap_layers(cfg, list(range(nxt, min(nxt + K, n))))[0] - 1


MASK_SCHEDULES = ("none", "depth_as_time", "curriculum")


def stage_mask_band(schedule: str, stage: int, n_stages: int, lo: float, hi: float) -> tuple[float, float] | None:
    """The mask-rate band [a, b] stage ``stage`` of ``n_stages`` supervises, or None (every rate)."""
    if schedule not in MASK_SCHEDULES:
        raise ValueError(f"objective.stage_mask_schedule must be one of {list(MASK_SCHEDULES)}, got {schedule!r}")
    if schedule == "none":
        return None
    w = (hi - lo) / n_stages
    if schedule == "depth_as_time":
        return (hi - (stage + 1) * w, hi - stage * w)
    return (lo, lo + (stage + 1) * w)


def banded_objective(objective, cfg, stage_index: int):
    """The stage's objective restricted to its ``objective.stage_mask_schedule`` band (unchanged when none)."""
    o = cfg.objective
    n = cfg.model.n_layers // cfg.train.layers_per_stage
    band = stage_mask_band(o.stage_mask_schedule, stage_index, n, o.mask_fraction_min, o.mask_fraction_max)
    return objective if band is None else dataclasses.replace(objective, band=band)
