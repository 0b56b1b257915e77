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
import shutil
import time

import torch

from ..config import FINE_TUNE_MODES, StackWiseConfig
from ..objective import Objective
from . import checkpoint as ckpt
from .evaluate import diffusion_elbo, eval_policy
from .precision import Precision
from .log import MetricsWriter, format_step, logger, progress_bar
from ..model import StackWiseLM
from .backends import build_stage
from .distributed import all_reduce_sum, barrier, distributed
from .run import RunDir
from .trainer import lr_at, make_optimizer


def _source(cfg: StackWiseConfig, run: RunDir) -> str:
    path = cfg.train.checkpoint or run.fused
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"fine-tuning starts from {path}, which does not exist; fuse the trained layers first "
            f"(python launchers/fuse.py --config {run.root}/config.yaml) or pass --checkpoint PATH"
        )
    return path


def finetune_batch(ds_train, objective: Objective, step: int, global_batch: int, seed: int) -> dict[str, torch.Tensor]:
    """The views of fine-tuning step ``step``: ``global_batch`` sequences and their masks, from (seed, step) only.

    Every rank draws the same global batch and takes its slice, so a world of N ranks with batch b trains on
    exactly the rows of one process with batch N*b, and a resumed run continues with the batches it would have seen.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(0, len(ds_train), (global_batch,), generator=g)
    ids = torch.stack([ds_train[int(i)] for i in idx])
    return objective.mask(ids, g)


def fine_tune(cfg: StackWiseConfig, mode: str | None = None) -> dict:
    """Fine-tune the run's fused model (or ``train.checkpoint``) with ``mode`` on any backend; returns the eval metrics.

    ``engine.backend`` single trains in this process; deepspeed / fsdp (under the deepspeed launcher or torchrun)
    shard the whole model like a stage (:mod:`stackwise.engine.backends`), with resumable state under
    ``runs/NAME/<backend>_finetune_<mode>/`` every ``train.checkpoint_interval`` steps.
    """
    mode = mode or cfg.objective.fine_tune_mode
    if mode not in FINE_TUNE_MODES:
        raise ValueError(f"--mode must be one of {list(FINE_TUNE_MODES)}, got {mode!r}")
    with distributed(cfg) as env:
        return _fine_tune(cfg, mode, env)


def _fine_tune(cfg: StackWiseConfig, mode: str, env) -> dict:
    run = RunDir(cfg)
    device = env.device
    if env.is_main:
        os.makedirs(run.root, exist_ok=True)  # fine-tuning a --checkpoint into a new train.out_dir
    barrier()
    model, model_cfg = ckpt.load_model(_source(cfg, run), device="cpu" if env.distributed else device)
    from ..data.datasets import build_datasets

    ds = build_datasets(dataclasses.replace(cfg, model=model_cfg.model))
    # the data's tokenizer must be the one the checkpoint was trained with (refused by name otherwise)
    ckpt.check_tokenizer(_source(cfg, run), getattr(getattr(ds, "tokenizer", None), "path", None))
    frozen = {f"layers.{i}.mlp.{n}.weight" for i, b in enumerate(model.layers) for n in b.mlp.frozen}

    def trainable(lm):
        out = {n: p for n, p in lm.named_parameters() if n not in frozen}
        for n, p in lm.named_parameters():
            p.requires_grad_(n in out)
        return out

    steps, base_lr = cfg.train.finetune_steps, cfg.train.finetune_lr or cfg.train.lr
    mask_kw = dict(mask_id=model_cfg.model.mask_id, vocab_size=model_cfg.model.vocab_size)
    policy_kw = dict(mask_kw, mask_fraction_min=cfg.objective.mask_fraction_min,
                     mask_fraction_max=cfg.objective.mask_fraction_max, mlm_rate=cfg.objective.mlm_rate)
    # the objective owns masking, loss weighting (objective.loss_weighting for diffusion) and attention mode
    objective = Objective.from_config(cfg.objective, model_cfg.model, mode)
    attention_mode = objective.attention_mode
    metrics = MetricsWriter(run.root, env.rank)
    B, world = cfg.train.batch_size, env.world_size
    tokens_per_step = B * world * cfg.data.seq_len
    start = 0
    if env.distributed:
        # the fused model is the "carry" of a stage spanning every layer, trained with the objective's attention
        stage_cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            model_cfg.model, attention=dataclasses.replace(model_cfg.model.attention, attention_mode=attention_mode)),
            train=dataclasses.replace(cfg.train, grad_accum=1, global_batch_size=0))
        state = {n: t.detach() for n, t in model.state_dict().items()}
        state_dir = os.path.join(run.root, f"{env.backend}_finetune_{mode}")
        del model
        stage = build_stage(stage_cfg, env, state_dir, 0, list(range(model_cfg.model.n_layers)), state, trainable)
        params = stage.params
        if cfg.train.resume and os.path.isdir(state_dir):
            start = stage.load()
            if start:
                logger.info("resumed fine-tuning (%s) from step %d (%s)", mode, start, state_dir)
    else:
        params = trainable(model)
        opt = make_optimizer(params, cfg)
        precision = Precision(cfg.train.dtype, device)
        model.train()
    logger.info("fine-tuning (%s, %s attention) from %s on %s x %d: %d steps, %s trainable params", mode,
                attention_mode, _source(cfg, run), env.backend, world, steps,
                f"{sum(getattr(p, 'ds_numel', p.numel()) for p in params.values()):,}")
    bar = progress_bar(steps, f"fine-tune {mode}", env.rank)
    if bar and start:
        bar.update(start)
    t_log = t0 = time.time()
    for step in range(start, steps):
        lr = lr_at(step, cfg, total=steps, base=base_lr)
        views = finetune_batch(ds.train, objective, step, B * world, cfg.train.seed + 11)
        if env.distributed:
            mine = {k: v[env.rank * B:(env.rank + 1) * B].to(device) for k, v in views.items()}
            lm = mine["loss_mask"]
            denom = (all_reduce_sum(objective.normalizer(lm)) / world).clamp_min(1 / world)
            stage.set_lr(lr)
            loss = stage(mine["x"], mine["targets"], lm, objective.weights(lm), denom)
            stage.backward(loss)
            gnorm = stage.finish_step()
            loss = all_reduce_sum(loss.detach()) / world
        else:
            for grp in opt.param_groups:
                grp["lr"] = lr
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
        if env.distributed and cfg.train.checkpoint_interval and (step + 1) % cfg.train.checkpoint_interval == 0 \
                and step + 1 < steps:
            stage.save(step + 1)
    if bar:
        bar.close()
    if env.distributed:
        full = stage.full_state()
        stage.close()
        del stage
        model = StackWiseLM(model_cfg.model)
        ckpt.load_into(model, full, "the gathered fine-tuned state", strict=False)
        model = model.to(device)
    result = {"mode": mode, "steps": steps, "seconds": round(time.time() - t0, 1)}
    if env.is_main:
        ev = dict(batch_size=B, limit=cfg.train.eval_sequences, seed=cfg.train.seed + 1, device=device)
        result.update({f"val_{k}": v for k, v in eval_policy(model, ds.val, mode, mask_kw=policy_kw, **ev).items()})
        if mode == "diffusion":
            result["val_elbo_nats_per_token"] = diffusion_elbo(model, ds.val, mask_id=mask_kw["mask_id"], **ev)
        out_cfg = dataclasses.replace(model_cfg, objective=dataclasses.replace(model_cfg.objective,
                                                                               fine_tune_mode=mode))
        out_cfg = dataclasses.replace(out_cfg, model=dataclasses.replace(
            out_cfg.model, attention=dataclasses.replace(out_cfg.model.attention, attention_mode=attention_mode)))
        ckpt.save_model(run.finetuned(mode), model, out_cfg, {"kind": f"finetuned_{mode}"})
        metrics.write(kind="finetune_eval", **result)
        logger.info("fine-tune %s done: %s -> %s", mode, {k: round(v, 4) for k, v in result.items()
                                                         if isinstance(v, float)}, run.finetuned(mode))
    barrier()
    if env.is_main and env.distributed:
        shutil.rmtree(os.path.join(run.root, f"{env.backend}_finetune_{mode}"), ignore_errors=True)
    return result
