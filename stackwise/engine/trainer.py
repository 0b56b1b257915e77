# SPDX-License-Identifier: MIT
"""One layer-wise stage on any backend: train layer(s) k on layer k-1's outputs, save, evaluate, cache outputs.

Stage 0 trains the embeddings, layer 0 (or the first block of ``layers_per_stage`` layers) and the head on
the masked views; stage k trains only its layers (and the head when ``train.stage_trains_head``) on
``acts/layer_{k-1}`` (or, with ``engine.cache=recompute``, on inputs recomputed by the frozen layers
0..k-1). Frozen seeded SwiGLU projections never reach the optimizer.

Backends (``stackwise.engine.distributed`` picks one): ``single`` runs the loop below on one process;
``deepspeed`` (ZeRO-3) and ``fsdp`` (FSDP2) run it on every rank through :mod:`stackwise.engine.backends`.
Each rank reads its slice of every global batch, and the global batch of a world of N ranks with
``train.batch_size`` B holds the same rows as a single process with batch N*B; the loss is normalised
by the global count of supervised tokens, so the trained layer matches that single-process run within
fp32 round-off. After training the sharded stage is gathered into a plain model: rank 0 writes the same
``layer_K.safetensors`` as the single backend, and evaluation and caching run data-parallel by shard.

A stage is resumable: every ``train.checkpoint_interval`` steps the backend's state goes to
``stage_K.state.safetensors`` (single), ``ds_stage_K/`` (DeepSpeed ``save_checkpoint``) or ``fsdp_stage_K/``
(torch.distributed.checkpoint); with ``train.resume`` the stage continues from there and, because the
batch order depends only on (seed, step), ends with the same weights as an uninterrupted run. A rerun
of a finished stage only (re)builds a missing cache.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import time
from dataclasses import dataclass, field

import torch

from ..config import StackWiseConfig
from ..data.activations import ShardStream
from ..model import StackWiseLM
from ..objective import masked_loss
from . import checkpoint as ckpt
from .backends import build_stage
from .distributed import DistEnv, all_reduce_sum, barrier, distributed
from .log import MetricsWriter, format_step, logger, progress_bar
from .recipes import init_new_layers, stage_config  # issue 13: depth recipes
from .recompute import FrozenPrefix
from .run import RunDir, ensure_views, init_run_dir, require_acts
from .precision import Precision
from .stage_io import cache_outputs, evaluate_stage, stage_forward, stage_objective

__all__ = ["StageResult", "cache_outputs", "evaluate_stage", "lr_at", "make_optimizer", "train_all", "train_stage",
           "trainable_params"]

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
        if cfg.train.stage_zero_init:
            # the new layers start as the identity (residual branches off): the stage begins at the last one's loss
            # only trained projections: a frozen seeded one is regenerated from its seed by every reader, so
            # zeroing it would make the checkpoint disagree with the weights the stage trained with
            with torch.no_grad():
                for k in layers:
                    model.layers[k].attn.o_proj.weight.zero_()
                    if "down" not in model.layers[k].mlp.frozen:
                        model.layers[k].mlp.down.weight.zero_()
        # issue-13 hook (stackwise/engine/recipes.py): start the new layers from trained ones
        if cfg.train.stage_init_from != "none":
            init_new_layers(model, layers, cfg.train.stage_init_from,
                            lambda k: ckpt.load_tensors(run.layer_ckpt(k))[0])
    return model.to(device)


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
    if torch.cuda.is_available():
        # dropout on a GPU draws from the CUDA generator: a resumed stage must continue its sequence too
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
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
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return int(meta["step"])


def _open_run(cfg: StackWiseConfig, env: DistEnv, layer: int) -> RunDir:
    # rank 0 writes config.yaml and the views first; the others read them after a barrier
    run = init_run_dir(cfg, env.rank) if env.is_main else None
    if env.is_main and layer == 0:
        ensure_views(cfg, run)
    barrier()
    return run or init_run_dir(cfg, env.rank)


def _carry(cfg: StackWiseConfig, run: RunDir, layers: list[int]) -> dict[str, torch.Tensor]:
    """Head (+ embeddings) that stage ``layers`` continues from: empty for stage 0."""
    if layers[0] == 0:
        return {}
    prev, _ = ckpt.load_tensors(run.layer_ckpt(layers[0] - 1))
    carry = {k: v for k, v in prev.items() if k in HEAD or k == "tok_embeddings.weight"}
    if not cfg.model.tie_embeddings:
        first, _ = ckpt.load_tensors(run.layer_ckpt(0))
        carry["tok_embeddings.weight"] = first["tok_embeddings.weight"]
    return carry


def _full_model(cfg, run, layers, device, state: dict[str, torch.Tensor]) -> StackWiseLM:
    """A plain stage model holding ``state`` (gathered from a sharded stage) on ``device``."""
    model = StackWiseLM(cfg.model, layers=layers)
    ckpt.load_into(model, state, "the gathered stage state", strict=False)
    return model.to(device)


def _release_host_memory() -> None:
    # glibc keeps freed arenas; hand them back so per-stage RSS shows real growth only
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mib() -> float:
    """Resident memory of this process (Linux /proc; 0 elsewhere), logged per stage to show no growth."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


def _remove_state(run: RunDir, layer: int, env: DistEnv) -> None:
    barrier()
    if env.is_main:
        for b in ("single", "deepspeed", "fsdp"):
            path = run.resume_state(layer, b)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.isfile(path):
                os.remove(path)
    barrier()


def _rebuild_missing_cache(cfg: StackWiseConfig, run: RunDir, layer: int, env: DistEnv) -> None:
    """Rebuild layer ``layer - 1``'s activation cache from the checkpoints of layers 0..layer-1 when it is missing.

    ``engine.cache_keep=last`` deletes older caches, so retraining a later stage would otherwise need every earlier
    stage rerun. Forward only, streamed shard by shard and data-parallel; when a checkpoint is missing nothing is
    done and :func:`require_acts` names the stage to train.
    """
    if run.has_acts(layer - 1) or cfg.engine.cache == "recompute" or not os.path.isfile(run.layer_ckpt(layer - 1)):
        return  # a missing layer k-1 checkpoint is refused by require_acts, naming the stage to train
    missing = [k for k in range(layer) if not os.path.isfile(run.layer_ckpt(k))]
    if missing:
        raise FileNotFoundError(
            f"layer {layer - 1}'s activation cache {os.path.dirname(run.acts(layer - 1, 'train'))} is missing and "
            f"cannot be rebuilt: {run.layer_ckpt(missing[0])} is missing too; train it first: python "
            f"launchers/train_layer.py --config {os.path.join(run.root, 'config.yaml')} --layer {missing[0]}"
        )
    t0 = time.time()
    logger.info("layer %d's activation cache is missing: rebuilding it from layers 0..%d (forward only)", layer - 1,
                layer - 1)
    prefix = list(range(layer))
    model = StackWiseLM(cfg.model, layers=prefix)
    for k in prefix:
        tensors, _ = ckpt.load_tensors(run.layer_ckpt(k))
        keep = {n: v for n, v in tensors.items() if n.startswith(f"layers.{k}.") or n == "tok_embeddings.weight"}
        ckpt.load_into(model, keep, run.layer_ckpt(k), strict=False)
    model.requires_grad_(False)
    cache_outputs(model.to(env.device), run, prefix, env.device, cfg, env)
    del model
    _release_host_memory()
    logger.info("rebuilt layer %d's cache in %.1f s", layer - 1, time.time() - t0)


def train_stage(cfg: StackWiseConfig, layer: int, env: DistEnv | None = None) -> StageResult:
    """Train the stage that starts at ``layer`` on any backend. See the module docstring.

    Args:
        cfg: the whole config; ``engine.backend`` (or the launcher) picks single, deepspeed or fsdp.
        layer: first layer of the stage.
        env: an initialised world (``train_all`` passes its own); None sets one up and tears it down.
    """
    if env is None:
        with distributed(cfg) as env:
            return _train_stage(cfg, layer, env)
    return _train_stage(cfg, layer, env)


def train_all(cfg: StackWiseConfig) -> list[StageResult]:
    """Every stage in order, in one process group (distributed stages free their engine in between)."""
    with distributed(cfg) as env:
        return [_train_stage(cfg, k, env) for k in range(0, cfg.model.n_layers, cfg.train.layers_per_stage)]


def _train_stage(cfg: StackWiseConfig, layer: int, env: DistEnv) -> StageResult:
    run = _open_run(cfg, env, layer)
    cfg = stage_config(cfg, layer)  # issue-13 hook: train.stage_steps gives this stage its own max_steps
    layers = run.stage_layers(layer)
    device, single = env.device, env.backend == "single"
    if layer > 0:
        _rebuild_missing_cache(cfg, run, layer, env)
        require_acts(run, layer - 1)
    metrics = MetricsWriter(run.root, env.rank)
    done = all(os.path.isfile(run.layer_ckpt(k)) for k in layers) and not run.has_stage_state(layer)
    if done:
        model = _stage_model(cfg, run, layers, device)
        for k in layers:
            tensors, _ = ckpt.load_tensors(run.layer_ckpt(k))
            ckpt.load_into(model, tensors, run.layer_ckpt(k), strict=False)
        if run.has_acts(layers[-1]):
            logger.info("stage %d is already trained and cached in %s; nothing to do", layer, run.root)
        else:
            logger.info("stage %d is trained but its cache is missing: rebuilding it", layer)
            cache_outputs(model, run, layers, device, cfg, env)
        vl, va = evaluate_stage(model, run, layers, device, cfg, env)
        return StageResult(layer, 0, float("nan"), vl, va, 0.0, skipped=True)

    torch.manual_seed(cfg.train.seed + 1000 * layer)
    objective = stage_objective(cfg)
    t, state_path = cfg.train, run.resume_state(layer, env.backend)
    recompute = cfg.engine.cache == "recompute" and layer > 0
    prefix = FrozenPrefix(cfg, run, layer, device) if recompute else None
    start, interrupted = 0, run.has_stage_state(layer)
    if single:
        model = _stage_model(cfg, run, layers, device)
        params = trainable_params(model, layers, cfg)
        opt = make_optimizer(params, cfg)
        precision = Precision(t.dtype, device)
        n_total, n_train = model.num_params(), sum(p.numel() for p in params.values())
        if t.resume and os.path.isfile(state_path):
            start = _load_state(state_path, params, opt)
    else:
        if t.stage_init_from != "none":  # issue-13 hook: recipes run on the single backend for now
            raise NotImplementedError(f"train.stage_init_from runs on engine.backend=single only, got "
                                      f"{env.backend!r}; set --train.stage_init_from=none or --engine.backend=single")
        if t.stage_zero_init:
            raise NotImplementedError(f"train.stage_zero_init runs on engine.backend=single only, got {env.backend!r}; "
                                      f"set --train.stage_zero_init=false or --engine.backend=single")
        stage = build_stage(cfg, env, state_path, layer, layers, _carry(cfg, run, layers),
                            lambda lm: trainable_params(lm, layers, cfg))
        n_total = stage.shard_report()[1]
        n_train = sum(getattr(p, "ds_numel", p.numel()) for p in stage.params.values())
        if t.resume and os.path.exists(state_path):
            start = stage.load()
    if start:
        logger.info("resumed stage %d from step %d (%s)", layer, start, state_path)
    elif interrupted:
        logger.info("found an interrupted stage %d; starting over (pass --resume to continue it with the same "
                    "engine.backend)", layer)
    tokens_per_step = t.batch_size * t.grad_accum * env.world_size * cfg.data.seq_len
    logger.info("stage %d: layers %s on %s | backend %s x %d | %s trainable of %s params | %s tokens/step | %d steps",
                layer, layers, device, env.backend, env.world_size, f"{n_train:,}", f"{n_total:,}",
                f"{tokens_per_step:,}", t.max_steps)
    prev = run.acts(layer - 1, "train") if layer > 0 and not recompute else None
    stream = iter(ShardStream(run.views("train"), prev, t.batch_size, seed=t.seed, start_step=start * t.grad_accum,
                              rank=env.rank, world=env.world_size))
    bar = progress_bar(t.max_steps, f"stage {layer}", env.rank)
    if bar:
        bar.update(start)
    history, t0, t_log, loss_acc = [], time.time(), time.time(), 0.0
    if single:
        model.train()
    last_good = start
    for step in range(start, t.max_steps):
        # train.stage_lr_decay: the i-th stage peaks at lr * decay**i
        lr = lr_at(step, cfg, base=t.lr * t.stage_lr_decay ** (layer // t.layers_per_stage))
        if single:
            for g in opt.param_groups:
                g["lr"] = lr
        else:
            stage.set_lr(lr)
        step_loss = torch.zeros((), device=device)
        for _ in range(t.grad_accum):
            batch = next(stream)
            if prefix is not None:
                batch = dict(batch, x=prefix(batch["x"]))
            if single:
                with precision.autocast():
                    _, logits, w = stage_forward(model, batch, layers, device, cfg)
                    loss = masked_loss(logits, batch["targets"].to(device), batch["loss_mask"].to(device), w)
                precision.backward(loss / t.grad_accum)
            else:
                lm = batch["loss_mask"].to(device)
                w = objective.weights(lm)
                # the global normaliser / world: the ranks' mean gradient is the gradient of the global loss
                denom = (all_reduce_sum(objective.normalizer(lm)) / env.world_size).clamp_min(1 / env.world_size)
                loss = stage(batch["x"].to(device), batch["targets"].to(device), lm, w, denom)
                stage.backward(loss)
            step_loss += loss.detach() / t.grad_accum
        if single:
            gnorm = precision.step(opt, list(params.values()), t.grad_clip)
        else:
            gnorm = stage.finish_step()
        if bar:
            bar.update(1)
        last = step + 1 == t.max_steps
        save_now = bool(t.checkpoint_interval) and (step + 1) % t.checkpoint_interval == 0 and not last
        log_now = (step + 1) % t.log_interval == 0 or last
        if save_now or log_now:
            lv = float(all_reduce_sum(step_loss) / (1 if single else env.world_size))  # one sync per log line
            # checked before every resumable save too, so a diverged state never replaces the last good one
            # (single only for gnorm: DeepSpeed may report no norm, and the loss catches it a step later)
            if not math.isfinite(lv) or (single and precision.scaler is None and not math.isfinite(float(gnorm))):
                what = f"loss became {lv}" if not math.isfinite(lv) else f"gradient norm became {float(gnorm)}"
                good = (f"the last good resumable checkpoint is {state_path} (step {last_good}); fix the cause and "
                        f"rerun with --resume to continue from it" if last_good else
                        "no resumable checkpoint was written yet; fix the cause and rerun the stage")
                raise FloatingPointError(f"stage {layer}: {what} at step {step + 1} (lower train.lr or check the "
                                         f"data); {good}")
        if log_now:
            dt = (time.time() - t_log) / t.log_interval
            t_log = time.time()
            history.append((step + 1, lv))
            line = format_step(step + 1, t.max_steps, layer, lv, lr, float(gnorm), dt * 1000,
                               tokens_per_step / max(dt, 1e-9))
            (bar.set_postfix_str(f"loss {lv:.4f}") if bar else logger.info(line))
            metrics.write(kind="train", stage=layer, step=step + 1, loss=lv, lr=lr, gnorm=float(gnorm))
            loss_acc = lv
        if save_now:
            if single:
                _save_state(state_path, params, opt, step + 1, torch.get_rng_state())
            else:
                stage.save(step + 1)
            last_good = step + 1
    if bar:
        bar.close()
    seconds = time.time() - t0
    if not single:
        # every rank gets the whole stage; the sharded engine is freed before evaluation and caching
        model = _full_model(cfg, run, layers, device, stage.full_state())
        stage.close()
        del stage
    del prefix
    _release_host_memory()
    if env.is_main:
        _save_layers(run, model, layers, cfg, t.max_steps)
    barrier()
    vl, va = evaluate_stage(model, run, layers, device, cfg, env)
    logger.info("stage %d done in %.1f s | val masked loss %.4f | val acc %.3f | rss %.0f MiB", layer, seconds, vl, va,
                _rss_mib())
    metrics.write(kind="stage", stage=layer, layers=layers, val_loss=vl, val_acc=va, train_loss=loss_acc,
                  seconds=seconds, trainable_params=n_train, backend=env.backend, world_size=env.world_size)
    cache_outputs(model, run, layers, device, cfg, env)
    _remove_state(run, layer, env)
    return StageResult(layer, t.max_steps, loss_acc, vl, va, seconds, history=history)
