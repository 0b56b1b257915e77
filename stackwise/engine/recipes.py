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
