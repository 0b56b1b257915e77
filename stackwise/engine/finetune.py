# SPDX-License-Identifier: MIT
"""Fine-tuning of a fused model on any backend: clm (causal attention, next-token loss), mlm (bidirectional, 15%
BERT masking) or diffusion (bidirectional, per-sequence mask rate, ``objective.loss_weighting``; this is also the
joint fine-tune of all layers after fusion).

All parameters train except the frozen SwiGLU projections, through the one loop
(:func:`~stackwise.engine.loop.train_loop`). Masks are drawn per step from a generator seeded by (seed, step):
every rank draws the same global batch and takes its slice, so N ranks with batch b train on the rows of one
process with batch N*b, and a resumed run (``train.resume``; state every ``train.checkpoint_interval`` steps in
``finetune_<mode>.state.safetensors`` / ``ds_finetune_<mode>/`` / ``fsdp_finetune_<mode>/``) continues with the
batches it would have seen. Writes ``finetuned_<mode>.safetensors`` whose config records the mode's attention
(causal for clm), so ``generate.py`` picks the right sampler by default.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from ..config import FINE_TUNE_MODES, StackWiseConfig
from ..objective import Objective
from . import checkpoint as ckpt
from .backends import StageModule, create_backend
from .distributed import barrier, distributed
from .evaluate import diffusion_elbo, eval_policy
from .log import MetricsWriter, logger
from .loop import train_loop
from .rundir import RunDir
from .stage_model import all_trainable


def finetune_source(cfg: StackWiseConfig, run: RunDir) -> str:
    """The model a fine-tune starts from: ``train.checkpoint`` if set, else the run's fused model (must exist)."""
    path = cfg.train.checkpoint or run.fused
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"fine-tuning starts from {path}, which does not exist; fuse the trained layers first "
            f"(python launchers/fuse.py --config {run.root}/config.yaml) or pass --checkpoint PATH"
        )
    return path


def finetune_batch(ds_train, objective: Objective, step: int, global_batch: int, seed: int) -> dict[str, torch.Tensor]:
    """The views of fine-tuning step ``step``: ``global_batch`` sequences and their masks, from (seed, step) only."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    idx = torch.randint(0, len(ds_train), (global_batch,), generator=g)
    ids = torch.stack([ds_train[int(i)] for i in idx])
    return objective.mask(ids, g)


def fine_tune(cfg: StackWiseConfig, mode: str | None = None) -> dict:
    """Fine-tune the run's fused model (or ``train.checkpoint``) with ``mode`` on any backend; returns the eval metrics.

    Raises:
        ValueError: an unknown mode.
        FileNotFoundError: no fused model (names the fuse command).
    """
    mode = mode or cfg.objective.fine_tune_mode
    if mode not in FINE_TUNE_MODES:
        raise ValueError(f"--mode must be one of {list(FINE_TUNE_MODES)}, got {mode!r}")
    with distributed(cfg) as env:
        return _fine_tune(cfg, mode, env)


def _fine_tune(cfg: StackWiseConfig, mode: str, env) -> dict:
    run, device, t = RunDir(cfg), env.device, cfg.train
    if env.is_main:
        os.makedirs(run.root, exist_ok=True)  # fine-tuning a --checkpoint into a new train.out_dir
    barrier()
    source = finetune_source(cfg, run)
    model, model_cfg = ckpt.load_model(source, device="cpu")
    from ..data.datasets import build_datasets

    ds = build_datasets(dataclasses.replace(cfg, model=model_cfg.model))
    # the data's tokenizer must be the one the checkpoint was trained with (refused by name otherwise)
    ckpt.check_tokenizer(source, getattr(getattr(ds, "tokenizer", None), "path", None))
    steps, base_lr = t.finetune_steps, t.finetune_lr or t.lr
    # the objective owns masking, loss weighting (objective.loss_weighting for diffusion) and attention mode
    objective = Objective.from_config(cfg.objective, model_cfg.model, mode)
    name = f"finetune_{mode}"
    trainable = all_trainable(model)
    backend = create_backend(env.backend, t, cfg.engine, env, run.resume_state(name, env.backend))
    layers = list(range(model_cfg.model.n_layers))
    backend.build(StageModule(model, layers, objective, cfg.engine.activation_checkpointing), trainable)
    del model
    start = backend.load_state() if t.resume else 0
    if start:
        logger.info("resumed fine-tuning (%s) from step %d (%s)", mode, start, backend.state_path)
    B, world, accum = t.batch_size, env.world_size, t.grad_accum
    logger.info("fine-tuning (%s, %s attention) from %s on %s x %d: %d steps, %s trainable params", mode,
                objective.attention_mode, source, env.backend, world, steps, f"{backend.counts()[0]:,}")

    def batches(step: int) -> list[dict]:
        views = finetune_batch(ds.train, objective, step, B * world * accum, t.seed + 11)
        rows = [(i * world + env.rank) * B for i in range(accum)]
        return [{k: v[r:r + B] for k, v in views.items()} for r in rows]

    result = train_loop(backend, batches, objective=objective, train=t, env=env, total=steps, base_lr=base_lr,
                        label=f"ft-{mode}", run_root=run.root, start=start, record={"kind": "finetune", "mode": mode},
                        tokens_per_step=B * world * accum * cfg.data.seq_len)
    model = backend.eval_model()
    out = {"mode": mode, "steps": steps, "seconds": round(result.seconds, 1)}
    if env.is_main:
        mask_kw = dict(mask_id=model_cfg.model.mask_id, vocab_size=model_cfg.model.vocab_size)
        policy_kw = dict(mask_kw, mask_fraction_min=cfg.objective.mask_fraction_min,
                         mask_fraction_max=cfg.objective.mask_fraction_max, mlm_rate=cfg.objective.mlm_rate)
        ev = dict(batch_size=B, limit=t.eval_sequences, seed=t.seed + 1, device=device)
        out.update({f"val_{k}": v for k, v in eval_policy(model, ds.val, mode, mask_kw=policy_kw, **ev).items()})
        if mode == "diffusion":
            out["val_elbo_nats_per_token"] = diffusion_elbo(model, ds.val, mask_id=mask_kw["mask_id"], **ev)
        out_cfg = dataclasses.replace(model_cfg, objective=dataclasses.replace(model_cfg.objective,
                                                                               fine_tune_mode=mode))
        out_cfg = dataclasses.replace(out_cfg, model=dataclasses.replace(
            out_cfg.model, attention=dataclasses.replace(out_cfg.model.attention,
                                                         attention_mode=objective.attention_mode)))
        ckpt.save_model(run.finetuned(mode), model, out_cfg, {"kind": f"finetuned_{mode}"})
        MetricsWriter(run.root).write(kind="finetune_eval", **out)
        logger.info("fine-tune %s done: %s -> %s", mode, {k: round(v, 4) for k, v in out.items()
                                                         if isinstance(v, float)}, run.finetuned(mode))
        run.remove_resume_state(name)
    barrier()
    return out
