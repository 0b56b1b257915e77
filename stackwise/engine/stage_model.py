# SPDX-License-Identifier: MIT
"""What a stage trains: its model (new layers, carried head and embeddings, starting-weight recipes), which of
its parameters train, and the layer files it writes.

Stage 0 trains the embeddings, its layers and the head; stage k trains its layers and (with
``train.stage_trains_head``) the head carried from stage k-1, on stage 0's embeddings. Frozen SwiGLU projections
(seeded, or imported tensors) never train.
"""

from __future__ import annotations

import torch

from ..config import StackWiseConfig
from ..model import StackWiseLM
from . import checkpoint as ckpt
from .recipes import (init_new_layers, load_overlapped, overlap_layers, stage_model_config,  # issue 13: depth
                      top_layers)
from .rundir import RunDir

HEAD = ("norm.weight", "output.weight")


def frozen_names(model: StackWiseLM, layers: list[int] | None = None) -> set[str]:
    """Names of the frozen MLP projections of ``layers`` (all built layers when None)."""
    idx = layers if layers is not None else [i for i, b in enumerate(model.layers) if hasattr(b, "mlp")]
    return {f"layers.{k}.mlp.{n}.weight" for k in idx for n in model.layers[k].mlp.frozen}


def all_trainable(model: StackWiseLM) -> dict[str, torch.nn.Parameter]:
    """Everything but the frozen projections trains (end-to-end and fine-tuning); sets ``requires_grad``."""
    frozen = frozen_names(model)
    out = {n: p for n, p in model.named_parameters() if n not in frozen}
    for n, p in model.named_parameters():
        p.requires_grad_(n in out)
    return out


def trainable_params(model: StackWiseLM, layers: list[int], cfg: StackWiseConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the stage's layers (+ head and the global head's blocks, + embeddings in stage 0);
    return the trainable ones."""
    first = layers[0]
    layers = list(layers) + top_layers(cfg)
    names = {f"layers.{k}." for k in layers}
    frozen = frozen_names(model, layers)
    out = {}
    for name, p in model.named_parameters():
        in_stage = any(name.startswith(n) for n in names)
        is_head = name in HEAD or name == "tok_embeddings.weight" and cfg.model.tie_embeddings
        is_embed = name == "tok_embeddings.weight"
        want = in_stage or (is_head and (first == 0 or cfg.train.stage_trains_head)) or (is_embed and first == 0)
        want = want and name not in frozen
        p.requires_grad_(want)
        if want:
            out[name] = p
    return out


def _is_top(name: str, cfg: StackWiseConfig) -> bool:
    return any(name.startswith(f"layers.{k}.") for k in top_layers(cfg))


def carried(cfg: StackWiseConfig, run: RunDir, layers: list[int]) -> dict[str, torch.Tensor]:
    """Head (+ embeddings, + the global head's blocks) that stage ``layers`` continues from: empty for stage 0."""
    if layers[0] == 0:
        return {}
    prev, _ = ckpt.load_tensors(run.layer_ckpt(layers[0] - 1))
    carry = {k: v for k, v in prev.items() if k in HEAD or k == "tok_embeddings.weight" or _is_top(k, cfg)}
    if not cfg.model.tie_embeddings:
        first, _ = ckpt.load_tensors(run.layer_ckpt(0))
        carry["tok_embeddings.weight"] = first["tok_embeddings.weight"]
    return carry


def stage_model(cfg: StackWiseConfig, run: RunDir, layers: list[int], *, recipes: bool = True) -> StackWiseLM:
    """The stage's model on the host: fresh seeded layers, the carried head/embeddings, and (``recipes``) the
    starting-weight recipes ``train.stage_zero_init`` / ``train.stage_init_from``."""
    # issue-13 hooks: + layer k-1 when overlapping, + the train.global_head blocks
    model = StackWiseLM(stage_model_config(cfg), layers=overlap_layers(cfg, layers) + top_layers(cfg))
    carry = carried(cfg, run, layers)
    if carry:
        ckpt.load_into(model, carry, run.layer_ckpt(layers[0] - 1), strict=False)
    load_overlapped(model, cfg, lambda k: ckpt.load_tensors(run.layer_ckpt(k))[0], layers)  # issue-13 hook
    if layers[0] > 0 and recipes:
        if cfg.train.stage_zero_init:
            # the new layers start as the identity (residual branches off); only trained projections: a frozen
            # seeded one is regenerated from its seed by every reader
            with torch.no_grad():
                for k in layers:
                    model.layers[k].attn.o_proj.weight.zero_()
                    if "down" not in model.layers[k].mlp.frozen:
                        model.layers[k].mlp.down.weight.zero_()
        if cfg.train.stage_init_from != "none":
            init_new_layers(model, layers, cfg.train.stage_init_from,
                            lambda k: ckpt.load_tensors(run.layer_ckpt(k))[0])
    return model


def load_trained(cfg: StackWiseConfig, run: RunDir, layers: list[int]) -> StackWiseLM:
    """A finished stage's model from its layer files (no recipes: every weight is read back)."""
    model = stage_model(cfg, run, layers, recipes=False)
    for k in layers:
        tensors, _ = ckpt.load_tensors(run.layer_ckpt(k))
        ckpt.load_into(model, tensors, run.layer_ckpt(k), strict=False)
    return model


def save_layers(run: RunDir, model: StackWiseLM, layers: list[int], cfg: StackWiseConfig, step: int) -> None:
    """``layer_K.safetensors`` for each layer of the stage (the last also holds the head and the global head's
    blocks, layer 0 the embeddings)."""
    state = ckpt.model_state(model)
    for k in layers:
        keep = {n: t for n, t in state.items() if n.startswith(f"layers.{k}.")}
        if k == layers[-1]:
            keep.update({n: t for n, t in state.items() if n in HEAD or _is_top(n, cfg)})
            if cfg.model.tie_embeddings:
                keep["output.weight"] = model.tok_embeddings.weight.detach()
        if k == 0:
            keep["tok_embeddings.weight"] = model.tok_embeddings.weight.detach()
        meta = ckpt.config_metadata(cfg)
        meta.update(kind="layer", layer=str(k), stage_layers=",".join(map(str, layers)), steps=str(step))
        ckpt.save_tensors(run.layer_ckpt(k), keep, meta)
