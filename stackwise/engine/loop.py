# SPDX-License-Identifier: MIT
"""THE training loop. Layer-wise and block-wise stages, the end-to-end baseline, joint and task fine-tuning and
the benchmarks all run :func:`train_loop` over a :class:`~stackwise.engine.backends.StageBackend`; nobody writes
another.

One optimizer step (:func:`train_step`): the step's global loss normaliser (the objective's count of supervised
tokens, or B*T under ``inv_t`` weights, summed over the step's micro-batches and the ranks), then
``backend.forward_backward`` per micro-batch; then ``backend.step()`` (clip + optimizer step). The loop adds the
warm-up + cosine learning rate (:func:`lr_at`), a NaN guard that names the last good resumable checkpoint, the
progress line (loss, lr, grad norm, time, tokens/s, peak memory, MFU on CUDA), ``metrics.jsonl`` and optional
TensorBoard, a progress bar on a terminal, and resumable saves every ``train.checkpoint_interval`` steps.
"""

from __future__ import annotations

import math
import os
import resource
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .distributed import DistEnv, all_reduce_sum
from .log import MetricsWriter, format_step, logger, progress_bar

__all__ = ["LoopResult", "lr_at", "peak_memory_gib", "train_loop", "train_step"]

# dense bf16 tensor-core peaks (FLOP/s) by device name fragment, for MFU on CUDA
_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40": 181e12, "A10": 125e12, "4090": 165e12}


def lr_at(step: int, train, total: int | None = None, base: float | None = None) -> float:
    """Linear warm-up over ``train.warmup_steps``, then cosine decay to ``train.min_lr_ratio * base``."""
    total = total or train.max_steps
    base = base or train.lr
    if step < train.warmup_steps:
        return base * (step + 1) / train.warmup_steps
    frac = (step - train.warmup_steps) / max(1, total - train.warmup_steps)
    return base * (train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory so far: CUDA ``max_memory_allocated``, or this process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in _PEAK_FLOPS.items() if k in name), None)


def train_step(backend, micro_batches: list[dict[str, torch.Tensor]], objective, world_size: int) -> tuple:
    """One optimizer step over this rank's micro-batches; returns (mean loss [detached tensor], grad norm)."""
    accum = len(micro_batches)
    # the step's supervised tokens over every micro-batch and rank: each micro-batch's loss sum is divided by
    # (global count / (world * accum)), and the backends divide by accum and average over ranks, so the gradient
    # is the global token mean whatever the split (per-micro-batch means would weight a sparsely masked
    # micro-batch's tokens more)
    dev = backend.env.device
    count = sum(objective.normalizer(b["loss_mask"].to(dev)) for b in micro_batches)
    parts = world_size * accum
    denom = (all_reduce_sum(count) / parts).clamp_min(1 / parts)
    step_loss = 0.0
    for batch in micro_batches:
        step_loss = step_loss + backend.forward_backward(batch, denom, accum) / accum
    return step_loss, backend.step()


@dataclass
class LoopResult:
    steps: int
    last_loss: float
    seconds: float
    history: list = field(default_factory=list)
    """[(step, loss)] at every logged step."""


class _TensorBoard:
    """``train.tensorboard``: scalars beside metrics.jsonl under ``<out_dir>/tensorboard`` (rank 0)."""

    def __init__(self, root: str, enabled: bool, rank: int):
        self.writer = None
        if enabled and rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise RuntimeError("train.tensorboard=true needs the tensorboard package: pip install tensorboard, "
                                   "or set --train.tensorboard=false") from None
            self.writer = SummaryWriter(os.path.join(root, "tensorboard"))

    def add(self, tag: str, values: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{tag}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def train_loop(backend, batches: Callable[[int], list[dict[str, torch.Tensor]]], *, objective, train, env: DistEnv,
               total: int, base_lr: float, label: int | str, run_root: str, start: int = 0,
               record: dict | None = None, tokens_per_step: int = 0, flops_per_token: float | None = None,
               lr_total: int | None = None) -> LoopResult:
    """Train ``backend`` from step ``start`` to ``total``.

    Args:
        backend: a built :class:`StageBackend` (resumed state already loaded when ``start`` > 0).
        batches: ``batches(step)`` gives this rank's micro-batches of that step (dicts with x, targets, loss_mask).
        objective: the :class:`~stackwise.objective.Objective` whose normaliser the loss uses.
        train: ``cfg.train`` (schedule, clipping, logging and checkpoint intervals, TensorBoard).
        total, base_lr: steps and peak learning rate of this run (a stage's or a fine-tune's own).
        label: what the progress line calls the run (a stage's first layer, or e.g. "ft-clm").
        run_root: the run directory (metrics.jsonl, TensorBoard).
        record: extra fields of every metrics.jsonl line (e.g. ``{"kind": "train", "stage": 3}``).
        tokens_per_step: global tokens per optimizer step (for tokens/s and MFU).
        flops_per_token: the planner's training FLOPs per token; gives MFU on CUDA.
        lr_total: length of the cosine schedule (``total`` unless a run is cut short on purpose).

    Raises:
        FloatingPointError: the loss (or gradient norm) became NaN/inf; names the last good resumable state.
    """
    record = dict(record or {"kind": "train"})
    metrics = MetricsWriter(run_root, env.rank)
    tb = _TensorBoard(run_root, getattr(train, "tensorboard", False), env.rank)
    peak = device_peak_flops(env.device)
    bar = progress_bar(total, f"{label}" if isinstance(label, str) else f"stage {label}", env.rank)
    if bar and start:
        bar.update(start)
    history, last, last_good = [], float("nan"), start
    t0 = t_log = time.time()
    n_since = 0
    for step in range(start, total):
        lr = lr_at(step, train, total=lr_total or total, base=base_lr)
        backend.set_lr(lr)
        loss, gnorm = train_step(backend, batches(step), objective, env.world_size)
        n_since += 1
        if bar:
            bar.update(1)
        done = step + 1 == total
        save_now = bool(train.checkpoint_interval) and (step + 1) % train.checkpoint_interval == 0 and not done
        log_now = (step + 1) % train.log_interval == 0 or done
        if save_now or log_now:
            # one host sync per log line: the loss averaged over ranks
            lv = float(all_reduce_sum(loss) / env.world_size)
            gn = float(gnorm)
            # checked before every resumable save too, so a diverged state never replaces the last good one
            bad_norm = backend.finite_grad_norm and not math.isfinite(gn)
            if not math.isfinite(lv) or bad_norm:
                what = f"loss became {lv}" if not math.isfinite(lv) else f"gradient norm became {gn}"
                good = (f"the last good resumable checkpoint is {backend.state_path} (step {last_good}); fix the cause "
                        f"and rerun with --resume to continue from it" if last_good else
                        "no resumable checkpoint was written yet; fix the cause and rerun")
                where = f"stage {label}" if isinstance(label, int) else label
                raise FloatingPointError(f"{where}: {what} at step {step + 1} (lower train.lr or check the data); "
                                         f"{good}")
        if log_now:
            dt = (time.time() - t_log) / max(n_since, 1)
            t_log, n_since = time.time(), 0
            last = lv
            history.append((step + 1, lv))
            mem = peak_memory_gib(env.device)
            tok_s = tokens_per_step / max(dt, 1e-9)
            # MFU from the planner's FLOPs per token; skipped for the first steps (compilation, warm-up)
            mfu = flops_per_token * tok_s / env.world_size / peak if peak and flops_per_token and step >= 5 else None
            line = format_step(step + 1, total, label, lv, lr, gn, dt * 1000, tok_s, mem, mfu)
            (bar.set_postfix_str(f"loss {lv:.4f}") if bar else logger.info(line))
            values = dict(loss=lv, lr=lr, gnorm=gn, mem_gib=round(mem, 3))
            if mfu is not None:
                values["mfu"] = round(mfu, 4)
            metrics.write(**record, step=step + 1, **values)
            tb.add(str(record.get("kind", "train")) + (f"/stage{record['stage']}" if "stage" in record else ""),
                   values, step + 1)
        if save_now:
            backend.save_state(step + 1)
            last_good = step + 1
    if bar:
        bar.close()
    tb.close()
    return LoopResult(total, last, time.time() - t0, history)
