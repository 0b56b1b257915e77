# SPDX-License-Identifier: MIT
"""One layer-wise stage: train layer(s) k on the cached outputs of layer k-1, save, evaluate, cache outputs.

Stage 0 trains the embeddings, layer 0 (or the first block of ``layers_per_stage`` layers) and the head on
the masked views; stage k trains only its layers (and the head when ``train.stage_trains_head``) on
``acts/layer_{k-1}``. Inputs of stage k never depend on weights trained later, so every stage is a plain
supervised problem; frozen seeded SwiGLU projections never reach the optimizer.

A stage is resumable: every ``train.checkpoint_interval`` steps the trainable weights, AdamW moments,
RNG state and step go to ``stage_K.state.safetensors`` (atomically); with ``train.resume`` the stage
continues from there and, because the batch order depends only on (seed, step), ends with the same
weights as an uninterrupted run. When training is done the layer files are written, then the layer's
outputs are cached; a rerun of a finished stage only (re)builds a missing cache.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..config import StackWiseConfig
from ..data.activations import ShardStream, ShardWriter, read_manifest, to_storage, views_fingerprint
from ..model import StackWiseLM
from ..objective import masked_accuracy, masked_loss
from . import checkpoint as ckpt
from .log import MetricsWriter, format_step, init_logging, logger, progress_bar
from .run import RunDir, ensure_views, init_run_dir, pick_device, require_acts

HEAD = ("norm.weight", "output.weight")


@dataclass
class StageResult:
    layer: int
    steps: int
    train_loss: float
    val_loss: float
    val_acc: float
    seconds: float
    skipped: bool = False
    history: list = field(default_factory=list)


def lr_at(step: int, cfg: StackWiseConfig, total: int | None = None, base: float | None = None) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    t = cfg.train
    total = total or t.max_steps
    base = base or t.lr
    if step < t.warmup_steps:
        return base * (step + 1) / t.warmup_steps
    frac = (step - t.warmup_steps) / max(1, total - t.warmup_steps)
    return base * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: StackWiseConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm gains and 1-D params are not decayed)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=t.lr, betas=(t.beta1, t.beta2))


def trainable_params(model: StackWiseLM, layers: list[int], cfg: StackWiseConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze everything but the stage's layers (+ head, + embeddings in stage 0); return the trainable ones."""
    first = layers[0]
    names = {f"layers.{k}." for k in layers}
    # frozen MLP projections (seeded, or imported tensors) never train
    frozen = {f"layers.{k}.mlp.{n}.weight" for k in layers for n in model.layers[k].mlp.frozen}
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


def _stage_model(cfg: StackWiseConfig, run: RunDir, layers: list[int], device) -> StackWiseLM:
    model = StackWiseLM(cfg.model, layers=layers)
    if layers[0] > 0:
        # the head (and tied embeddings) continue from the previous stage; embeddings come from stage 0
        prev, _ = ckpt.load_tensors(run.layer_ckpt(layers[0] - 1))
        first, _ = ckpt.load_tensors(run.layer_ckpt(0))
        carry = {k: v for k, v in prev.items() if k in HEAD or k == "tok_embeddings.weight"}
        if not cfg.model.tie_embeddings:
            carry["tok_embeddings.weight"] = first["tok_embeddings.weight"]
        ckpt.load_into(model, carry, run.layer_ckpt(layers[0] - 1), strict=False)
    return model.to(device)


def _forward(model, batch, layers, device, cfg):
    x = batch["x"].to(device)
    h = model.embed(x) if layers[0] == 0 else x
    h = model.run_layers(h, layers[0], layers[-1] + 1, "bidirectional")
    logits = model.head(h)
    weights = 1.0 / batch["rate"].to(device) if cfg.objective.loss_weighting == "inv_t" else None
    return h, logits, weights


def _save_layers(run: RunDir, model: StackWiseLM, layers: list[int], cfg: StackWiseConfig, step: int) -> None:
    state = ckpt.model_state(model)
    for k in layers:
        keep = {n: t for n, t in state.items() if n.startswith(f"layers.{k}.")}
        if k == layers[-1]:
            keep.update({n: t for n, t in state.items() if n in HEAD})
            if cfg.model.tie_embeddings:
                keep["output.weight"] = model.tok_embeddings.weight.detach()
        if k == 0:
            keep["tok_embeddings.weight"] = model.tok_embeddings.weight.detach()
        meta = ckpt.config_metadata(cfg)
        meta.update(kind="layer", layer=str(k), stage_layers=",".join(map(str, layers)), steps=str(step))
        ckpt.save_tensors(run.layer_ckpt(k), keep, meta)


def _save_state(path, params, opt, step, gen_state) -> None:
    tensors = {f"param/{n}": p.detach() for n, p in params.items()}
    names = {id(p): n for n, p in params.items()}
    adam_steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"exp_avg/{n}"] = st["exp_avg"]
                tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"]
                adam_steps[n] = float(st["step"])
    tensors["rng/torch"] = gen_state
    import json

    ckpt.save_tensors(path, tensors, {"kind": "stage_state", "step": str(step), "adam_steps": json.dumps(adam_steps)})


def _load_state(path, params, opt) -> int:
    import json

    tensors, meta = ckpt.load_tensors(path)
    adam_steps = json.loads(meta["adam_steps"])
    names = {id(p): n for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            if f"param/{n}" not in tensors:
                raise ckpt.CheckpointError(f"{path} lacks parameter {n}; delete it and restart the stage")
            p.copy_(tensors[f"param/{n}"])
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if n in adam_steps:
                opt.state[p] = {"step": torch.tensor(adam_steps[n]), "exp_avg": tensors[f"exp_avg/{n}"].to(p.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device)}
    torch.set_rng_state(tensors["rng/torch"])
    return int(meta["step"])


@torch.no_grad()
def evaluate_stage(model, run: RunDir, layers, device, cfg) -> tuple[float, float]:
    """Masked-token loss and accuracy on the held-out views after this stage's layers."""
    model.eval()
    prev = run.acts(layers[0] - 1, "val") if layers[0] > 0 else None
    stream = ShardStream(run.views("val"), prev, cfg.train.batch_size, shuffle=False)
    tot_loss = tot_acc = n = 0.0
    for batch in stream:
        _, logits, _ = _forward(model, batch, layers, device, cfg)
        lm = batch["loss_mask"].to(device)
        k = float(lm.sum())
        tot_loss += float(masked_loss(logits, batch["targets"].to(device), lm)) * k
        tot_acc += float(masked_accuracy(logits, batch["targets"].to(device), lm)) * k
        n += k
    model.train()
    return tot_loss / max(n, 1), tot_acc / max(n, 1)


@torch.no_grad()
def cache_outputs(model, run: RunDir, layers, device, cfg, rank: int = 0) -> None:
    """Write the outputs of the stage's last layer for every train and val view (row-aligned shards)."""
    model.eval()
    k = layers[-1]
    for split in ("train", "val"):
        prev = run.acts(layers[0] - 1, split) if layers[0] > 0 else None
        views = read_manifest(run.views(split))
        writer = ShardWriter(run.acts(k, split), "layer")
        stream = ShardStream(run.views(split), prev, cfg.engine.cache_shard_sequences, shuffle=False)
        bar = progress_bar(views["rows"], f"cache layer {k} {split}", rank)
        for batch in stream:  # batch size == shard rows, so batches map 1:1 onto shards
            x = batch["x"].to(device)
            h = model.embed(x) if layers[0] == 0 else x
            h = model.run_layers(h, layers[0], k + 1, "bidirectional")
            writer.add({"h": to_storage(h, cfg.engine.cache_dtype)})
            if bar:
                bar.update(x.shape[0])
        if bar:
            bar.close()
        writer.close({"layer": k, "dtype": cfg.engine.cache_dtype, "d_model": cfg.model.d_model,
                      "views": views_fingerprint(views)})
    logger.info("cached layer %d outputs (%s) under %s", k, cfg.engine.cache_dtype, os.path.dirname(run.acts(k, "x")))
    if cfg.engine.cache_keep == "last" and layers[0] > 0:
        old = os.path.dirname(run.acts(layers[0] - 1, "train"))
        shutil.rmtree(old, ignore_errors=True)
        logger.info("removed %s (engine.cache_keep=last)", old)
    model.train()


def train_stage(cfg: StackWiseConfig, layer: int) -> StageResult:
    """Train the stage that starts at ``layer`` (single process, CPU or one GPU). See the module docstring."""
    init_logging(0)
    cfg.check_world(1)
    run = init_run_dir(cfg)
    layers = run.stage_layers(layer)
    device = pick_device(cfg)
    if layer == 0:
        ensure_views(cfg, run)
    else:
        require_acts(run, layer - 1)
    metrics = MetricsWriter(run.root)
    done = all(os.path.isfile(run.layer_ckpt(k)) for k in layers) and not os.path.isfile(run.stage_state(layer))
    if done:
        model = _stage_model(cfg, run, layers, device)
        for k in layers:
            tensors, _ = ckpt.load_tensors(run.layer_ckpt(k))
            ckpt.load_into(model, tensors, run.layer_ckpt(k), strict=False)
        if run.has_acts(layers[-1]):
            logger.info("stage %d is already trained and cached in %s; nothing to do", layer, run.root)
        else:
            logger.info("stage %d is trained but its cache is missing: rebuilding it", layer)
            cache_outputs(model, run, layers, device, cfg)
        vl, va = evaluate_stage(model, run, layers, device, cfg)
        return StageResult(layer, 0, float("nan"), vl, va, 0.0, skipped=True)

    torch.manual_seed(cfg.train.seed + 1000 * layer)
    model = _stage_model(cfg, run, layers, device)
    params = trainable_params(model, layers, cfg)
    opt = make_optimizer(params, cfg)
    n_total, n_train = model.num_params(), sum(p.numel() for p in params.values())
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    start = 0
    if cfg.train.resume and os.path.isfile(run.stage_state(layer)):
        start = _load_state(run.stage_state(layer), params, opt)
        logger.info("resumed stage %d from step %d (%s)", layer, start, run.stage_state(layer))
    elif os.path.isfile(run.stage_state(layer)):
        logger.info("found an interrupted stage %d (%s); starting over (pass --resume to continue it)", layer,
                    run.stage_state(layer))
    logger.info("stage %d: layers %s on %s | %s trainable of %s params | %s tokens/step | %d steps",
                layer, layers, device, f"{n_train:,}", f"{n_total:,}", f"{tokens_per_step:,}", cfg.train.max_steps)
    prev = run.acts(layer - 1, "train") if layer > 0 else None
    stream = iter(ShardStream(run.views("train"), prev, cfg.train.batch_size, seed=cfg.train.seed,
                              start_step=start * cfg.train.grad_accum))
    bar = progress_bar(cfg.train.max_steps, f"stage {layer}")
    if bar:
        bar.update(start)
    history, t0, t_log, loss_acc = [], time.time(), time.time(), 0.0
    model.train()
    step = start
    for step in range(start, cfg.train.max_steps):
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        step_loss = torch.zeros((), device=device)
        for _ in range(cfg.train.grad_accum):
            batch = next(stream)
            _, logits, w = _forward(model, batch, layers, device, cfg)
            loss = masked_loss(logits, batch["targets"].to(device), batch["loss_mask"].to(device), w)
            (loss / cfg.train.grad_accum).backward()
            step_loss += loss.detach() / cfg.train.grad_accum
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if bar:
            bar.update(1)
        last = step + 1 == cfg.train.max_steps
        if (step + 1) % cfg.train.log_interval == 0 or last:
            lv = float(step_loss)  # one sync per log interval
            if not math.isfinite(lv):
                raise FloatingPointError(
                    f"stage {layer}: loss became {lv} at step {step + 1}; the last good resumable checkpoint is "
                    f"{run.stage_state(layer)} (if present). Lower train.lr or check the data."
                )
            dt = (time.time() - t_log) / cfg.train.log_interval
            t_log = time.time()
            history.append((step + 1, lv))
            line = format_step(step + 1, cfg.train.max_steps, layer, lv, lr, float(gnorm), dt * 1000,
                               tokens_per_step / max(dt, 1e-9))
            (bar.set_postfix_str(f"loss {lv:.4f}") if bar else logger.info(line))
            metrics.write(kind="train", stage=layer, step=step + 1, loss=lv, lr=lr, gnorm=float(gnorm))
            loss_acc = lv
        if cfg.train.checkpoint_interval and (step + 1) % cfg.train.checkpoint_interval == 0 and not last:
            _save_state(run.stage_state(layer), params, opt, step + 1, torch.get_rng_state())
    if bar:
        bar.close()
    seconds = time.time() - t0
    _save_layers(run, model, layers, cfg, cfg.train.max_steps)
    vl, va = evaluate_stage(model, run, layers, device, cfg)
    logger.info("stage %d done in %.1f s | val masked loss %.4f | val acc %.3f", layer, seconds, vl, va)
    metrics.write(kind="stage", stage=layer, layers=layers, val_loss=vl, val_acc=va, train_loss=loss_acc,
                  seconds=seconds, trainable_params=n_train)
    cache_outputs(model, run, layers, device, cfg)
    if os.path.isfile(run.stage_state(layer)):
        os.remove(run.stage_state(layer))
    return StageResult(layer, cfg.train.max_steps, loss_acc, vl, va, seconds, history=history)


def train_all(cfg: StackWiseConfig) -> list[StageResult]:
    """Every stage in order (single process)."""
    return [train_stage(cfg, k) for k in range(0, cfg.model.n_layers, cfg.train.layers_per_stage)]
