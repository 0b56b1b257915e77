# SPDX-License-Identifier: MIT
"""After a stage has trained: held-out evaluation and caching of the stage's outputs, data-parallel.

Both run on a plain (unsharded) copy of the stage and split the work by shard: rank r takes the shards
``r, r + world, ...``, so no rank reads the whole cache and no collective runs inside the loop (ranks
may hold different numbers of shards). Evaluation sums (loss, accuracy, tokens) over ranks at the end;
caching writes each rank's shards under their global index, and rank 0 writes the manifest after
gathering every rank's shard entries. A world of one is the single-process case.
"""

from __future__ import annotations

import os
import shutil

import torch

from ..config import StackWiseConfig
from ..data.activations import ShardStream, ShardWriter, read_manifest, to_storage, views_fingerprint
from ..objective import Objective, masked_accuracy, masked_loss
from .distributed import DistEnv, all_gather_object, all_reduce_sum, barrier
from .log import logger, progress_bar
from .rundir import RunDir
from .recipes import top_layers
from .stage_module import StageModule

_ONE = DistEnv()


def stage_objective(cfg: StackWiseConfig) -> Objective:
    """The objective every stage (and the end-to-end baseline) trains with: diffusion on the stored views."""
    return Objective.from_config(cfg.objective, cfg.model, "diffusion")


@torch.no_grad()
def evaluate_stage(model, run: RunDir, layers, device, cfg: StackWiseConfig, env: DistEnv = _ONE
                   ) -> tuple[float, float]:
    """Masked-token loss and accuracy on the held-out views after this stage's layers (all ranks agree)."""
    model.eval()
    prev = run.acts(layers[0] - 1, "val") if layers[0] > 0 else None
    stream = ShardStream(run.views("val"), prev, cfg.train.batch_size, shuffle=False)
    sums = torch.zeros(3, dtype=torch.float64)
    unit = StageModule(model, layers, stage_objective(cfg), top=top_layers(cfg))
    for _, batch in stream.shard_batches(list(range(env.rank, stream.n_shards, env.world_size)),
                                         cfg.train.batch_size):
        logits = unit.logits(batch["x"].to(device))
        lm = batch["loss_mask"].to(device)
        k = float(lm.sum())
        sums[0] += float(masked_loss(logits, batch["targets"].to(device), lm)) * k
        sums[1] += float(masked_accuracy(logits, batch["targets"].to(device), lm)) * k
        sums[2] += k
    sums = all_reduce_sum(sums.to(device)).cpu()
    model.train()
    return float(sums[0] / max(sums[2], 1)), float(sums[1] / max(sums[2], 1))


@torch.no_grad()
def cache_outputs(model, run: RunDir, layers, device, cfg: StackWiseConfig, env: DistEnv = _ONE,
                  rows: set[int] | None = None) -> None:
    """Write the outputs of ``layers[-1]`` (run from ``layers[0] - 1``'s cache, or the ids) for the cached splits:
    row-aligned shards, one per view shard. ``rows``: the train shards to write (the others are recorded as not
    cached, see :meth:`ShardWriter.skip`); None writes every one. The held-out split is always whole."""
    model.eval()
    k, part = layers[-1], ""
    for split in run.cache_splits():
        prev = run.acts(layers[0] - 1, split) if layers[0] > 0 else None
        views = read_manifest(run.views(split))
        if env.is_main:
            writer = ShardWriter(run.acts(k, split), "layer")
        barrier()
        if not env.is_main:
            writer = ShardWriter(run.acts(k, split), "layer", fresh=False)
        stream = ShardStream(run.views(split), prev, cfg.engine.cache_shard_sequences, shuffle=False)
        keep = set(range(stream.n_shards)) if rows is None or split != "train" else rows
        if keep != set(range(stream.n_shards)):
            part = f"; {split}: {len(keep)} of {stream.n_shards} shards"
        mine = [i for i in range(env.rank, stream.n_shards, env.world_size) if i in keep]
        if env.is_main:
            for i in sorted(set(range(stream.n_shards)) - keep):
                writer.skip(views["shards"][i]["rows"], i)
        bar = progress_bar(sum(views["shards"][i]["rows"] for i in keep), f"cache layer {k} {split}", env.rank)
        for i, batch in stream.shard_batches(mine):
            x = batch["x"].to(device)
            h = model.embed(x) if layers[0] == 0 else x
            h = model.run_layers(h, layers[0], k + 1, cfg.model.attention.attention_mode)
            writer.add({"h": to_storage(h, cfg.engine.cache_dtype)}, index=i)
            if bar:
                bar.update(x.shape[0] * env.world_size)
        if bar:
            bar.close()
        entries = [s for part in all_gather_object(writer.shards) for s in part]
        if env.is_main:
            writer.close({"layer": k, "dtype": cfg.engine.cache_dtype, "d_model": cfg.model.d_model,
                          "views": views_fingerprint(views)}, shards=entries)
        barrier()
    logger.info("cached layer %d outputs (%s, %s%s) under %s", k, cfg.engine.cache_dtype,
                "+".join(run.cache_splits()), part, os.path.dirname(run.acts(k, "val")))
    if cfg.engine.cache_keep == "last" and layers[0] > 0 and env.is_main:
        old = os.path.dirname(run.acts(layers[0] - 1, "val"))
        shutil.rmtree(old, ignore_errors=True)
        logger.info("removed %s (engine.cache_keep=last)", old)
    barrier()
    model.train()
