# SPDX-License-Identifier: MIT
"""Layer-wise stages: planning (which layers, which inputs) and ``train_stage`` / ``train_all`` on the one loop.

Stage 0 trains the embeddings, its layers (``train.layers_per_stage`` of them) and the head on the masked views;
stage k trains its layers (and the carried head when ``train.stage_trains_head``) on layer k-1's outputs, read
from the activation cache (``engine.cache=disk``; rebuilt from the layer files when it is missing) or recomputed
by the frozen layers 0..k-1 (``engine.cache=recompute``). Any backend (:mod:`stackwise.engine.backends`) trains
it through :func:`stackwise.engine.loop.train_loop`: each rank reads its slice of every global batch, and the
loss is normalised by the global count of supervised tokens, so N ranks with batch B match one process with
batch N*B within fp32 round-off.

After training, a stage caches one layer's outputs: the next stage's input (:func:`~.recipes.cache_layer`), on
the train shards the later stages read (:func:`rows_read`; every shard under ``engine.cache_rows=all``) and the
whole held-out split.

A stage is resumable: every ``train.checkpoint_interval`` steps the backend saves its state; with
``train.resume`` the stage continues from there and, because the batch order depends only on (seed, step), ends
with the same weights as an uninterrupted run. A rerun of a finished stage only (re)builds a missing cache.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field

import torch

from ..config import ConfigError, StackWiseConfig
from ..data.activations import ShardStream, read_manifest
from ..model import StackWiseLM
from . import checkpoint as ckpt
from .backends import StageModule, create_backend
from .distributed import DistEnv, barrier, distributed
from .log import MetricsWriter, logger
from .loop import train_loop
from .recipes import (banded_objective, cache_layer, overlap_layers, overlap_lr_scale,  # issue 13: depth
                      stage_config, stage_data_offset, top_layers)
from .recompute import FrozenPrefix
from .rundir import RunDir, open_run
from .stage_io import cache_outputs, evaluate_stage, stage_objective
from .stage_model import load_trained, save_layers, stage_model, trainable_params

__all__ = ["Stage", "StageResult", "next_stage", "plan_stage", "require_acts", "train_all", "train_stage"]


@dataclass(frozen=True)
class Stage:
    """One stage of a layer-wise run: its index, its layers and where its inputs come from."""

    index: int
    """0, 1, ...: the stage's position (stage i starts at layer i * train.layers_per_stage)."""
    layers: tuple[int, ...]
    inputs: str
    """ids (stage 0: masked token ids), cache (layer k-1's cached outputs) or recompute (frozen layers 0..k-1)."""

    @property
    def first(self) -> int:
        return self.layers[0]

    @property
    def name(self) -> str:
        """File stem of its resumable state (``stage_<first layer>``)."""
        return f"stage_{self.first}"


def plan_stage(cfg: StackWiseConfig, first: int) -> Stage:
    """The stage that starts at layer ``first``.

    Raises:
        ConfigError: ``first`` is out of range or not the first layer of a stage.
    """
    K, n = cfg.train.layers_per_stage, cfg.model.n_layers
    if not 0 <= first < n:
        raise ConfigError(f"--layer {first} is out of range: model.n_layers is {n} (layers 0..{n - 1})")
    if first % K:
        raise ConfigError(f"--layer {first} is not the first layer of a stage: with train.layers_per_stage={K} "
                          f"stages start at layers {list(range(0, n, K))}")
    inputs = "ids" if first == 0 else ("recompute" if cfg.engine.cache == "recompute" else "cache")
    return Stage(first // K, tuple(range(first, min(first + K, n))), inputs)


def next_stage(cfg: StackWiseConfig) -> int:
    """First layer of the earliest stage without a checkpoint and cache (the default of ``--layer``)."""
    run = RunDir(cfg)
    K = cfg.train.layers_per_stage
    for first in range(0, cfg.model.n_layers, K):
        last, out = min(first + K, cfg.model.n_layers) - 1, cache_layer(cfg, first)
        cached = out < 0 or run.has_acts(out)
        if not os.path.isfile(run.layer_ckpt(last)) or not cached or run.has_resume_state(f"stage_{first}"):
            return first
    raise ConfigError(
        f"every stage of {run.root} is already trained ({cfg.model.n_layers} layers); pass --layer K to retrain one "
        f"(delete layer_K.safetensors first) or fuse: python launchers/fuse.py --config {run.root}/config.yaml"
    )


def require_acts(run: RunDir, k: int) -> None:
    """Refuse to start stage k+1 without layer k's checkpoint and cache, naming what to run."""
    path = run.layer_ckpt(k)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"layer {k}'s checkpoint {path} is missing, so layer {k + 1} has no inputs; train it first: "
            f"python launchers/train_layer.py --config {os.path.join(run.root, 'config.yaml')} --layer {k}"
        )
    for split in run.cache_splits():
        read_manifest(run.acts(k, split), what=f"layer {k}'s activation cache")
    if run.cfg.engine.cache == "recompute":
        for j in range(k):
            if not os.path.isfile(run.layer_ckpt(j)):
                raise FileNotFoundError(
                    f"engine.cache=recompute rebuilds layer {k + 1}'s inputs from layers 0..{k}, but "
                    f"{run.layer_ckpt(j)} is missing; train layer {j} first or use engine.cache=disk"
                )


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


def _remove_state(run: RunDir, stage: Stage, env: DistEnv) -> None:
    barrier()
    if env.is_main:
        run.remove_resume_state(stage.name)
    barrier()


def rows_read(cfg: StackWiseConfig, run: RunDir, env: DistEnv, index: int) -> set[int] | None:
    """Train view shards that stages ``index``, ``index + 1``, ... read (their slices of the batch order, this world
    size), which is what a cache written before stage ``index`` must hold; None (every shard) under
    ``engine.cache_rows=all``."""
    if cfg.engine.cache_rows == "all":
        return None
    K, n, t = cfg.train.layers_per_stage, cfg.model.n_layers, cfg.train
    stream = ShardStream(run.views("train"), None, t.batch_size, seed=t.seed, world=env.world_size, prefetch=False)
    out: set[int] = set()
    for i in range(index, -(-n // K)):
        steps = stage_config(cfg, i * K).train.max_steps
        out |= stream.shards_read(stage_data_offset(cfg, i) * t.grad_accum, steps * t.grad_accum)
    return out


def _missing_rows(run: RunDir, k: int, rows: set[int] | None) -> list[int]:
    """Shards of ``rows`` (all when None) that layer k's train cache does not hold (it must exist)."""
    if "train" not in run.cache_splits():
        return []
    shards = read_manifest(run.acts(k, "train"), what=f"layer {k}'s activation cache")["shards"]
    want = range(len(shards)) if rows is None else sorted(rows)
    return [i for i in want if not shards[i]["files"]]


def _rebuild_missing_cache(cfg: StackWiseConfig, run: RunDir, layer: int, env: DistEnv,
                           rows: set[int] | None = None) -> None:
    """Rebuild layer ``layer - 1``'s activation cache from the checkpoints of layers 0..layer-1 when it is missing
    or lacks some of the train ``rows`` this and the later stages read (``engine.cache_rows=read`` caches only
    those; a stage run with another batch size, world size or split needs others).

    ``engine.cache_keep=last`` deletes older caches, so retraining a later stage would otherwise need every earlier
    stage rerun. Forward only, streamed shard by shard and data-parallel; when a checkpoint is missing nothing is
    done and :func:`require_acts` names the stage to train.
    """
    if cfg.engine.cache == "recompute" or not os.path.isfile(run.layer_ckpt(layer - 1)):
        return
    if run.has_acts(layer - 1):
        lack = _missing_rows(run, layer - 1, rows)
        if not lack:
            return
        logger.info("layer %d's activation cache lacks %d train shards this run reads (it was cached for another "
                    "batch order): rebuilding it", layer - 1, len(lack))
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
    cache_outputs(model.to(env.device), run, prefix, env.device, cfg, env, rows=rows)
    del model
    _release_host_memory()
    logger.info("rebuilt layer %d's cache in %.1f s", layer - 1, time.time() - t0)


def train_stage(cfg: StackWiseConfig, layer: int, env: DistEnv | None = None) -> StageResult:
    """Train the stage that starts at ``layer`` on any backend. See the module docstring.

    Args:
        cfg: the whole config; ``engine.backend`` (or the launcher) picks the backend.
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
    stage = plan_stage(cfg, layer)
    run = open_run(cfg, env, views=layer == 0)
    offset = stage_data_offset(cfg, stage.index)  # train.stage_data=continue: where this stage's batches start
    cfg = stage_config(cfg, layer)  # issue-13 hook: train.stage_steps gives this stage its own max_steps
    layers, device, t = list(stage.layers), env.device, cfg.train
    # issue-13 hook: train.stage_overlap runs (and trains) layers k-w..k-1 too, on layer k-w-1's outputs (ids at 0)
    ran = overlap_layers(cfg, layers)
    out = cache_layer(cfg, layer)  # the layer whose outputs this stage caches: the next stage's input
    if stage.inputs == "cache" and ran[0] > 0:  # the stage's input, layer ran[0]-1's cache, with every row it reads
        _rebuild_missing_cache(cfg, run, ran[0], env, rows_read(cfg, run, env, stage.index))
    for k in range(ran[0], layer):  # the overlapped layers start from their trained files
        if not os.path.isfile(run.layer_ckpt(k)):
            raise FileNotFoundError(
                f"layer {k}'s checkpoint {run.layer_ckpt(k)} is missing and stage {layer} retrains it "
                f"(train.stage_overlap); train it first: python launchers/train_layer.py --config "
                f"{os.path.join(run.root, 'config.yaml')} --layer {k}")
    if ran[0] > 0:
        require_acts(run, ran[0] - 1)
    done = all(os.path.isfile(run.layer_ckpt(k)) for k in layers) and not run.has_resume_state(stage.name)
    if done:
        model = load_trained(cfg, run, layers).to(device)
        vl, va = evaluate_stage(model, run, ran, device, cfg, env)
        if out < 0 or run.has_acts(out):
            logger.info("stage %d is already trained and cached in %s; nothing to do", layer, run.root)
        else:
            logger.info("stage %d is trained but its cache is missing: rebuilding it", layer)
            _cache_stage(model, run, ran, out, stage, device, cfg, env)
        return StageResult(layer, 0, float("nan"), vl, va, 0.0, skipped=True)

    torch.manual_seed(t.seed + 1000 * layer)
    objective = banded_objective(stage_objective(cfg), cfg, stage.index)  # issue-13 hook: per-stage mask-rate band
    lm = stage_model(cfg, run, layers)
    trainable = trainable_params(lm, ran, cfg)
    state_path, interrupted = run.resume_state(stage.name, env.backend), run.has_resume_state(stage.name)
    backend = create_backend(env.backend, t, cfg.engine, env, state_path)
    backend.build(StageModule(lm, ran, objective, cfg.engine.activation_checkpointing,
                              lr_scale=overlap_lr_scale(cfg, layers, lm), top=top_layers(cfg)), trainable)
    del lm
    n_train, n_total = backend.counts()
    start = backend.load_state() if t.resume else 0
    if start:
        logger.info("resumed stage %d from step %d (%s)", layer, start, state_path)
    elif interrupted:
        logger.info("found an interrupted stage %d; starting over (pass --resume to continue it with the same "
                    "engine.backend)", layer)
    tokens_per_step = t.batch_size * t.grad_accum * env.world_size * cfg.data.seq_len
    logger.info("stage %d: layers %s on %s | backend %s x %d | %s trainable of %s params | %s tokens/step | %d steps",
                layer, layers, device, env.backend, env.world_size, f"{n_train:,}", f"{n_total:,}",
                f"{tokens_per_step:,}", t.max_steps)
    prefix = FrozenPrefix(cfg, run, ran[0], device) if stage.inputs == "recompute" and ran[0] > 0 else None
    prev = run.acts(ran[0] - 1, "train") if stage.inputs == "cache" and ran[0] > 0 else None
    stream = iter(ShardStream(run.views("train"), prev, t.batch_size, seed=t.seed,
                              start_step=(offset + start) * t.grad_accum,
                              rank=env.rank, world=env.world_size))

    def batches(step: int) -> list[dict]:
        out = [next(stream) for _ in range(t.grad_accum)]
        return [dict(b, x=prefix(b["x"])) for b in out] if prefix is not None else out

    # train.stage_lr_decay: the i-th stage peaks at lr * decay**i
    result = train_loop(backend, batches, objective=objective, train=t, env=env, total=t.max_steps,
                        base_lr=t.lr * t.stage_lr_decay ** stage.index, label=layer, run_root=run.root, start=start,
                        record={"kind": "train", "stage": layer}, tokens_per_step=tokens_per_step,
                        flops_per_token=_flops_per_token(cfg, env))
    # every rank gets the whole stage back; a sharded engine is freed before evaluation and caching
    model = backend.eval_model()
    del backend, prefix
    _release_host_memory()
    if env.is_main:
        save_layers(run, model, ran, cfg, t.max_steps)
    barrier()
    vl, va = evaluate_stage(model, run, ran, device, cfg, env)
    logger.info("stage %d done in %.1f s | val masked loss %.4f | val acc %.3f | rss %.0f MiB", layer, result.seconds,
                vl, va, _rss_mib())
    MetricsWriter(run.root, env.rank).write(
        kind="stage", stage=layer, layers=layers, val_loss=vl, val_acc=va, train_loss=result.last_loss,
        seconds=result.seconds, trainable_params=n_train, backend=env.backend, world_size=env.world_size)
    _cache_stage(model, run, ran, out, stage, device, cfg, env)
    _remove_state(run, stage, env)
    return StageResult(layer, t.max_steps, result.last_loss, vl, va, result.seconds, history=result.history)


def _cache_stage(model, run: RunDir, ran: list[int], out: int, stage: Stage, device, cfg: StackWiseConfig,
                 env: DistEnv) -> None:
    """Cache layer ``out``'s outputs (the next stage's input; the last layer after the last stage) for the train rows
    the later stages read and the whole held-out split; nothing when the next stage reads the ids. Under
    ``engine.cache_keep=last`` the stage's own input cache is then deleted."""
    if out < 0:
        return
    rows = rows_read(cfg, run, env, stage.index + 1)
    cache_outputs(model, run, ran[:ran.index(out) + 1], device, cfg, env, rows=rows)


def _flops_per_token(cfg: StackWiseConfig, env: DistEnv) -> float | None:
    """The planner's training FLOPs per token of one stage (for MFU); only computed on CUDA."""
    if env.device.type != "cuda":
        return None
    from ..plan import plan_stage as plan

    return plan(cfg, world_size=env.world_size).flops_per_token
