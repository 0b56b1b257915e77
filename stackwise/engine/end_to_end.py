# SPDX-License-Identifier: MIT
"""End-to-end training of the whole model with the diffusion objective: the baseline layer-wise training is
measured against (``benchmarks/quality_bench.py``).

It is built to be comparable with :func:`stackwise.engine.trainer.train_all`, not to be fast: it reads the
run's masked views (``acts/views_train``, the masked ids, targets and masks every stage trains on) through
the same :class:`~stackwise.data.activations.ShardStream` with the same seed and batch size, so step s sees
exactly the batch that step s of every stage sees; it uses the same AdamW (:func:`make_optimizer`), the same
warm-up + cosine schedule (:func:`lr_at`) over ``train.max_steps``, gradient clipping, loss (masked
cross-entropy, 1/t weighted when ``objective.loss_weighting=inv_t``) and trainable set (everything but the
frozen seeded SwiGLU projections). With ``train.max_steps`` S, every parameter group gets S * batch tokens,
as every layer of a layer-wise run does. One process (CPU or one GPU); no resume.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..config import StackWiseConfig
from ..data.activations import ShardStream
from ..model import StackWiseLM
from ..objective import masked_loss
from . import checkpoint as ckpt
from .precision import Precision
from .log import MetricsWriter, format_step, init_logging, logger
from .run import ensure_views, init_run_dir, pick_device
from .stage_io import evaluate_stage, stage_forward
from .trainer import lr_at, make_optimizer

__all__ = ["train_end_to_end"]


def train_end_to_end(cfg: StackWiseConfig, *, name: str = "end_to_end") -> dict:
    """Train all layers, embeddings and head jointly for ``train.max_steps`` steps on the run's masked views.

    Args:
        cfg: the run's config (``train.out_dir`` is the run directory; the views are built there if missing).
        name: file stem of the saved model (``<out_dir>/<name>.safetensors``) and ``kind`` of its metrics records.

    Returns:
        dict: ``steps``, ``train_loss`` (last logged), ``val_loss`` / ``val_acc`` (held-out views, as a stage
        reports them), ``seconds``, ``history`` ([(step, loss)]) and ``path`` of the saved model.

    Raises:
        FloatingPointError: the loss became NaN/inf (lower ``train.lr``).
    """
    init_logging(0)
    run = init_run_dir(cfg)
    ensure_views(cfg, run)
    device = pick_device(cfg)
    torch.manual_seed(cfg.train.seed)
    model = StackWiseLM(cfg.model).to(device)
    frozen = {f"layers.{i}.mlp.{n}.weight" for i, b in enumerate(model.layers) for n in b.mlp.frozen}
    params = {n: p for n, p in model.named_parameters() if n not in frozen}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    opt = make_optimizer(params, cfg)
    precision = Precision(cfg.train.dtype, device)
    t, layers = cfg.train, list(range(cfg.model.n_layers))
    tokens_per_step = t.batch_size * t.grad_accum * cfg.data.seq_len
    logger.info("end-to-end: %d layers on %s | %s trainable params | %s tokens/step | %d steps", len(layers), device,
                f"{sum(p.numel() for p in params.values()):,}", f"{tokens_per_step:,}", t.max_steps)
    stream = iter(ShardStream(run.views("train"), None, t.batch_size, seed=t.seed))
    metrics = MetricsWriter(run.root)
    history, last, t0, t_log = [], float("nan"), time.time(), time.time()
    model.train()
    for step in range(t.max_steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for _ in range(t.grad_accum):
            batch = next(stream)
            with precision.autocast():
                _, logits, w = stage_forward(model, batch, layers, device, cfg)
                loss = masked_loss(logits, batch["targets"].to(device), batch["loss_mask"].to(device), w)
            precision.backward(loss / t.grad_accum)
            step_loss += loss.detach() / t.grad_accum
        gnorm = precision.step(opt, list(params.values()), t.grad_clip)
        if (step + 1) % t.log_interval == 0 or step + 1 == t.max_steps:
            last = float(step_loss)
            if not math.isfinite(last):
                raise FloatingPointError(f"end-to-end loss became {last} at step {step + 1}; lower train.lr")
            dt = (time.time() - t_log) / t.log_interval
            t_log = time.time()
            history.append((step + 1, last))
            logger.info(format_step(step + 1, t.max_steps, "e2e", last, lr, float(gnorm), dt * 1000,
                                    tokens_per_step / max(dt, 1e-9)))
            metrics.write(kind=f"{name}_train", step=step + 1, loss=last, lr=lr, gnorm=float(gnorm))
    seconds = time.time() - t0
    vl, va = evaluate_stage(model, run, layers, device, cfg)
    path = os.path.join(run.root, f"{name}.safetensors")
    ckpt.save_model(path, model, cfg, {"kind": name})
    metrics.write(kind=name, val_loss=vl, val_acc=va, train_loss=last, seconds=seconds, steps=t.max_steps)
    logger.info("end-to-end done in %.1f s | val masked loss %.4f | val acc %.3f -> %s", seconds, vl, va, path)
    return {"steps": t.max_steps, "train_loss": last, "val_loss": vl, "val_acc": va, "seconds": seconds,
            "history": history, "path": path}
