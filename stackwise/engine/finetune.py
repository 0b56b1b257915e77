# SPDX-License-Identifier: MIT
"""Fine-tuning of a fused model: clm (causal attention, next-token loss), mlm (bidirectional, 15% BERT
masking) or diffusion (bidirectional, per-sequence mask rate; joint fine-tuning of all layers).

All parameters train except the frozen SwiGLU projections. Masks are drawn fresh every step from a
seeded generator. Writes ``finetuned_<mode>.safetensors`` whose config records the mode's attention
(causal for clm), so ``generate.py`` picks the right sampler by default.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch

from ..config import FINE_TUNE_MODES, StackWiseConfig
from ..objective import Objective
from . import checkpoint as ckpt
from .evaluate import diffusion_elbo, eval_policy
from .precision import Precision
from .log import MetricsWriter, format_step, init_logging, logger, progress_bar
from .run import RunDir, pick_device
from .trainer import lr_at, make_optimizer


def _source(cfg: StackWiseConfig, run: RunDir) -> str:
    path = cfg.train.checkpoint or run.fused
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"fine-tuning starts from {path}, which does not exist; fuse the trained layers first "
            f"(python launchers/fuse.py --config {run.root}/config.yaml) or pass --checkpoint PATH"
        )
    return path


def fine_tune(cfg: StackWiseConfig, mode: str | None = None) -> dict:
    """Fine-tune the run's fused model (or ``train.checkpoint``) with ``mode``; returns the eval metrics."""
    init_logging(0)
    mode = mode or cfg.objective.fine_tune_mode
    if mode not in FINE_TUNE_MODES:
        raise ValueError(f"--mode must be one of {list(FINE_TUNE_MODES)}, got {mode!r}")
    run = RunDir(cfg)
    device = pick_device(cfg)
    model, model_cfg = ckpt.load_model(_source(cfg, run), device=device)
    from ..data.datasets import build_datasets

    ds = build_datasets(dataclasses.replace(cfg, model=model_cfg.model))
    frozen = {f"layers.{i}.mlp.{n}.weight" for i, b in enumerate(model.layers) for n in b.mlp.frozen}
    params = {n: p for n, p in model.named_parameters() if n not in frozen}
    for n, p in model.named_parameters():
        p.requires_grad_(n in params)
    opt = make_optimizer(params, cfg)
    precision = Precision(cfg.train.dtype, device)
    steps, base_lr = cfg.train.finetune_steps, cfg.train.finetune_lr or cfg.train.lr
    mask_kw = dict(mask_id=model_cfg.model.mask_id, vocab_size=model_cfg.model.vocab_size)
    policy_kw = dict(mask_kw, mask_fraction_min=cfg.objective.mask_fraction_min,
                     mask_fraction_max=cfg.objective.mask_fraction_max, mlm_rate=cfg.objective.mlm_rate)
    # the objective owns masking, loss weighting (objective.loss_weighting for diffusion) and attention mode
    objective = Objective.from_config(cfg.objective, model_cfg.model, mode)
    attention_mode = objective.attention_mode
    g = torch.Generator().manual_seed(cfg.train.seed + 7)
    order = torch.Generator().manual_seed(cfg.train.seed + 11)
    metrics = MetricsWriter(run.root)
    B = cfg.train.batch_size
    tokens_per_step = B * cfg.data.seq_len
    logger.info("fine-tuning (%s, %s attention) from %s: %d steps, %s trainable params", mode, attention_mode,
                _source(cfg, run), steps, f"{sum(p.numel() for p in params.values()):,}")
    bar = progress_bar(steps, f"fine-tune {mode}")
    model.train()
    t_log = t0 = time.time()
    for step in range(steps):
        lr = lr_at(step, cfg, total=steps, base=base_lr)
        for grp in opt.param_groups:
            grp["lr"] = lr
        idx = torch.randint(0, len(ds.train), (B,), generator=order)
        ids = torch.stack([ds.train[int(i)] for i in idx])
        views = objective.mask(ids, g)
        with precision.autocast():
            logits = model(views["x"].to(device), attention_mode=attention_mode)
            loss = objective.loss(logits, views["targets"].to(device), views["loss_mask"].to(device))
        precision.backward(loss)
        gnorm = precision.step(opt, list(params.values()), cfg.train.grad_clip)
        if bar:
            bar.update(1)
        if (step + 1) % cfg.train.log_interval == 0 or step + 1 == steps:
            lv = float(loss.detach())
            if lv != lv or lv in (float("inf"), float("-inf")):
                raise FloatingPointError(f"fine-tuning loss became {lv} at step {step + 1}; lower train.finetune_lr")
            dt = (time.time() - t_log) / cfg.train.log_interval
            t_log = time.time()
            line = format_step(step + 1, steps, f"ft-{mode}", lv, lr, float(gnorm), dt * 1000, tokens_per_step / dt)
            (bar.set_postfix_str(f"loss {lv:.4f}") if bar else logger.info(line))
            metrics.write(kind="finetune", mode=mode, step=step + 1, loss=lv, lr=lr)
    if bar:
        bar.close()
    ev = dict(batch_size=B, limit=cfg.train.eval_sequences, seed=cfg.train.seed + 1, device=device)
    result = {"mode": mode, "steps": steps, "seconds": round(time.time() - t0, 1)}
    result.update({f"val_{k}": v for k, v in eval_policy(model, ds.val, mode, mask_kw=policy_kw if mode != "diffusion"
                                                          else policy_kw, **ev).items()})
    if mode == "diffusion":
        result["val_elbo_nats_per_token"] = diffusion_elbo(model, ds.val, mask_id=mask_kw["mask_id"], **ev)
    out_cfg = dataclasses.replace(model_cfg, objective=dataclasses.replace(model_cfg.objective, fine_tune_mode=mode))
    out_cfg = dataclasses.replace(out_cfg, model=dataclasses.replace(
        out_cfg.model, attention=dataclasses.replace(out_cfg.model.attention, attention_mode=attention_mode)))
    ckpt.save_model(run.finetuned(mode), model, out_cfg, {"kind": f"finetuned_{mode}"})
    metrics.write(kind="finetune_eval", **result)
    logger.info("fine-tune %s done: %s -> %s", mode, {k: round(v, 4) for k, v in result.items()
                                                     if isinstance(v, float)}, run.finetuned(mode))
    return result
