# SPDX-License-Identifier: MIT
"""End-to-end training of the whole model with the diffusion objective: the baseline layer-wise training is
measured against (``benchmarks/quality_bench.py``), on any backend.

It is the one-stage special case of a layer-wise run: a :class:`~stackwise.engine.backends.StageModule` over every
layer, trained by the same loop (:func:`~stackwise.engine.loop.train_loop`) on the run's masked views through the
same :class:`~stackwise.data.activations.ShardStream`, seed and batch size, so step s sees exactly the batch step s
of every stage sees, with the same AdamW, schedule, clipping, loss and normaliser. With ``train.max_steps`` S,
every parameter gets S * batch tokens, as every layer of a layer-wise run does. Resumable like a stage
(``end_to_end.state.safetensors`` / ``ds_end_to_end/`` / ``fsdp_end_to_end/``).
"""

from __future__ import annotations

import os

import torch

from ..config import StackWiseConfig
from ..data.activations import ShardStream
from ..model import StackWiseLM
from . import checkpoint as ckpt
from .backends import StageModule, create_backend
from .distributed import barrier, distributed
from .log import MetricsWriter, logger
from .loop import train_loop
from .rundir import open_run
from .stage_io import evaluate_stage, stage_objective
from .stage_model import all_trainable

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
    with distributed(cfg) as env:
        run = open_run(cfg, env, views=True)
        t, layers = cfg.train, list(range(cfg.model.n_layers))
        torch.manual_seed(t.seed)
        model = StackWiseLM(cfg.model)
        trainable = all_trainable(model)
        objective = stage_objective(cfg)
        backend = create_backend(env.backend, t, cfg.engine, env, run.resume_state(name, env.backend))
        backend.build(StageModule(model, layers, objective, cfg.engine.activation_checkpointing), trainable)
        del model
        start = backend.load_state() if t.resume else 0
        tokens_per_step = t.batch_size * t.grad_accum * env.world_size * cfg.data.seq_len
        logger.info("end-to-end: %d layers on %s | backend %s x %d | %s trainable params | %s tokens/step | %d steps%s",
                    len(layers), env.device, env.backend, env.world_size, f"{backend.counts()[0]:,}",
                    f"{tokens_per_step:,}", t.max_steps, f" | resumed at step {start}" if start else "")
        stream = iter(ShardStream(run.views("train"), None, t.batch_size, seed=t.seed, start_step=start * t.grad_accum,
                                  rank=env.rank, world=env.world_size))
        result = train_loop(backend, lambda step: [next(stream) for _ in range(t.grad_accum)], objective=objective,
                            train=t, env=env, total=t.max_steps, base_lr=t.lr, label="e2e", run_root=run.root,
                            start=start, record={"kind": f"{name}_train"}, tokens_per_step=tokens_per_step)
        model = backend.eval_model()
        vl, va = evaluate_stage(model, run, layers, env.device, cfg, env)
        path = os.path.join(run.root, f"{name}.safetensors")
        if env.is_main:
            ckpt.save_model(path, model, cfg, {"kind": name})
            MetricsWriter(run.root).write(kind=name, val_loss=vl, val_acc=va, train_loss=result.last_loss,
                                          seconds=result.seconds, steps=t.max_steps)
            run.remove_resume_state(name)
            logger.info("end-to-end done in %.1f s | val masked loss %.4f | val acc %.3f -> %s", result.seconds, vl,
                        va, path)
        barrier()
        return {"steps": t.max_steps, "train_loss": result.last_loss, "val_loss": vl, "val_acc": va,
                "seconds": result.seconds, "history": result.history, "path": path}
