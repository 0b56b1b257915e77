# SPDX-License-Identifier: MIT
"""Fusion: merge the per-stage layer checkpoints into one model and prove it equals the staged pipeline.

The fused model takes layer K's weights from ``layer_K.safetensors``, the input embeddings from stage 0
(the embeddings every cached activation was computed with) and the head from the last stage. When later
stages trained a tied head, input embeddings and head have diverged, so the fused model is saved untied
(``model.tie_embeddings: false`` in its config) — that is the only way its outputs equal the staged ones.

Check: on held-out views, the fused model's final hidden states must equal the cached outputs of the
last layer (written while training, stage by stage), to the cache dtype's precision.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..config import StackWiseConfig
from ..data.activations import ShardStream, read_manifest
from ..model import StackWiseLM
from . import checkpoint as ckpt
from .log import init_logging, logger
from .rundir import RunDir

TOL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-3}


class FusionError(RuntimeError):
    """The fused model does not reproduce the staged outputs, or the layer checkpoints do not belong together."""


def fuse(cfg: StackWiseConfig, *, check: bool = True) -> str:
    """Write ``fused.safetensors`` for the run of ``cfg`` and return its path."""
    init_logging(0)
    run = RunDir(cfg)
    n = cfg.model.n_layers
    layer_tensors = []
    for k in range(n):
        if not os.path.isfile(run.layer_ckpt(k)):
            raise FileNotFoundError(
                f"{run.layer_ckpt(k)} is missing: train layer {k} before fusing "
                f"(python launchers/train_layer.py --config {run.root}/config.yaml --layer {k})"
            )
        tensors, meta = ckpt.load_tensors(run.layer_ckpt(k))
        other = ckpt.config_from_metadata(meta, run.layer_ckpt(k))
        if other.model != cfg.model:
            raise FusionError(f"{run.layer_ckpt(k)} was trained with a different model config; it cannot be fused here")
        layer_tensors.append(tensors)
    embed = layer_tensors[0]["tok_embeddings.weight"]
    head = layer_tensors[-1]["output.weight"]
    tied = cfg.model.tie_embeddings and torch.equal(embed, head)
    fused_cfg = cfg
    g = cfg.train.global_head if cfg.train.global_head_fusion == "keep" else 0
    if g:  # train.global_head kept: its blocks become the fused model's last layers
        fused_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, n_layers=n + g))
        logger.info("train.global_head=%d kept at fusion: the fused model has %d layers (%d..%d are the global "
                    "head)", g, n + g, n, n + g - 1)
    elif cfg.train.global_head:
        logger.info("train.global_head dropped at fusion (train.global_head_fusion=drop): the head now reads layer "
                    "%d directly", n - 1)
    if cfg.model.tie_embeddings and not tied:
        fused_cfg = dataclasses.replace(fused_cfg, model=dataclasses.replace(fused_cfg.model, tie_embeddings=False))
        logger.info("later stages trained the tied head: the fused model keeps stage 0's input embeddings and the "
                    "last stage's head (saved untied)")
    model = StackWiseLM(fused_cfg.model)
    state = {"tok_embeddings.weight": embed, "output.weight": head, "norm.weight": layer_tensors[-1]["norm.weight"]}
    for k, tensors in enumerate(layer_tensors):
        state.update({name: t for name, t in tensors.items() if name.startswith(f"layers.{k}.")})
    for k in range(n, n + g):
        state.update({name: t for name, t in layer_tensors[-1].items() if name.startswith(f"layers.{k}.")})
    if fused_cfg.model.tie_embeddings:
        state.pop("output.weight")
    ckpt.load_into(model, state, run.fused)
    if check:
        err, scale = check_fused(model, run, cfg)
        logger.info("fusion check: max |fused - staged| on held-out views = %.2e, %.1e of max |h| = %.1f (cache %s: "
                    "exact in float32; rounding of the cached inputs accumulates otherwise)", err, err / scale, scale,
                    cfg.engine.cache_dtype)
    ckpt.save_model(run.fused, model, fused_cfg, {"kind": "fused"})
    logger.info("wrote %s (%s params)", run.fused, f"{model.num_params():,}")
    return run.fused


@torch.no_grad()
def check_fused(model: StackWiseLM, run: RunDir, cfg: StackWiseConfig, max_batches: int = 2) -> tuple[float, float]:
    """(max abs difference, max |h|) between fused outputs and the cached last-layer outputs on held-out views."""
    last = cfg.model.n_layers - 1
    read_manifest(run.acts(last, "val"), what=f"layer {last}'s held-out cache (needed for the fusion check)")
    model.eval()
    stream = ShardStream(run.views("val"), None, cfg.train.batch_size, shuffle=False)
    cached = ShardStream(run.views("val"), run.acts(last, "val"), cfg.train.batch_size, shuffle=False)
    worst, scale = 0.0, 1.0
    for i, (views, staged) in enumerate(zip(stream, cached)):
        if i >= max_batches:
            break
        h = model.run_layers(model.embed(views["x"]), 0, cfg.model.n_layers, cfg.model.attention.attention_mode)
        worst = max(worst, float((h - staged["x"]).abs().max()))
        scale = max(scale, float(staged["x"].abs().max()))
    if worst > TOL[cfg.engine.cache_dtype] * scale:
        raise FusionError(
            f"fused model differs from the staged outputs by {worst:.3e} (tolerance {TOL[cfg.engine.cache_dtype]:.0e}"
            f" x {scale:.1f}); a layer checkpoint was changed after its cache was written: retrain from that layer"
        )
    return worst, scale
