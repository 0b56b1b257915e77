# SPDX-License-Identifier: MIT
"""Streaming reader of the activation store: :class:`ShardStream`, deterministic and prefetching.

Batches come in an order that depends only on (seed, epoch, step), so a resumed stage sees exactly the
batches the uninterrupted run would have. A background thread reads (and verifies, see
:func:`~stackwise.data.activations.read_shard_array`) the next shard while the current one is consumed, so
hashing overlaps training; at most two shards are in memory.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

import numpy as np
import torch

from .activations import ActivationCacheError, from_storage, load_shard, read_manifest


class ShardStream:
    """Deterministic, prefetching batch stream over view shards (+ optionally a row-aligned layer cache).

    Args:
        views_dir: ``acts/views_<split>``.
        layer_dir: ``acts/layer_K/<split>`` whose rows are the inputs; None means the masked ids are.
        batch_size: rows per batch; an epoch is floor(rows / batch_size) batches.
        seed: order seed; shard and row order are permutations drawn from (seed, epoch).
        start_step: first batch to yield (resume), counted from step 0 of epoch 0.
        shuffle: False streams rows in stored order (cache building, evaluation).
        rank, world: data parallelism (shuffle only). The stream of a world of ``world`` ranks is the stream
            of one process with batch ``batch_size * world``: global batch g holds the same rows in both,
            and rank r gets its rows ``[r * batch_size, (r + 1) * batch_size)``. A rank reads (and
            verifies) only the shards that hold some of its rows; with ``batch_size`` a multiple of the
            shard size, ranks read disjoint shards.

    Per-shard access (evaluation, data-parallel caching) goes through :meth:`shard_batches`.

    Yields:
        dict with ``x`` (LongTensor ids [B, T] or float h [B, T, C]), ``targets``, ``loss_mask``, ``rate``.
    """

    def __init__(self, views_dir: str, layer_dir: str | None, batch_size: int, *, seed: int = 0,
                 start_step: int = 0, shuffle: bool = True, prefetch: bool = True, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank ({rank}) must be in [0, world={world})")
        if world > 1 and not shuffle:
            raise ValueError("a data-parallel ShardStream (world > 1) must shuffle; use shard_batches() per rank")
        self.rank, self.world = rank, world
        self.views_dir, self.layer_dir = views_dir, layer_dir
        self.views = read_manifest(views_dir, what="masked-view cache")
        self.layer = read_manifest(layer_dir) if layer_dir else None
        if self.layer is not None and [s["rows"] for s in self.layer["shards"]] != [s["rows"] for s in self.views["shards"]]:
            raise ActivationCacheError(
                f"{layer_dir} is not row-aligned with {views_dir} (it was built from other views); delete it and "
                f"rerun the stage that writes it"
            )
        self.batch_size, self.seed, self.start_step = batch_size, seed, start_step
        self.shuffle, self.prefetch = shuffle, prefetch
        self.rows = self.views["rows"]
        gb = batch_size * world
        if self.rows < gb and shuffle:
            raise ActivationCacheError(
                f"{views_dir} holds {self.rows} views, fewer than the global batch (train.batch_size {batch_size} * "
                f"world size {world} = {gb}); lower the batch size or use more data"
            )
        self.steps_per_epoch = max(1, self.rows // gb) if shuffle else -(-self.rows // batch_size)

    def _order(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        n = len(self.views["shards"])
        if not self.shuffle:
            return [(i, np.arange(self.views["shards"][i]["rows"])) for i in range(n)]
        rng = np.random.default_rng([self.seed, epoch])
        return [(int(i), rng.permutation(self.views["shards"][int(i)]["rows"])) for i in rng.permutation(n)]

    def _load(self, i: int) -> dict[str, np.ndarray]:
        arrays = load_shard(self.views_dir, self.views, i)
        if self.layer is not None:
            arrays["h"] = load_shard(self.layer_dir, self.layer, i)["h"]
            # a diverged layer (or an edited file with a matching manifest) must not train the next one
            if not torch.isfinite(from_storage(arrays["h"], self.layer["dtype"])).all():
                path = os.path.join(self.layer_dir, self.layer["shards"][i]["files"]["h"]["file"])
                raise ActivationCacheError(
                    f"activation shard {path} holds NaN/inf values: the layer that wrote it diverged or the file was "
                    f"altered; delete {self.layer_dir} and retrain that stage (lower train.lr if it diverges again)"
                )
        return arrays

    def _shard_iter(self, plan: list[int]) -> Iterator[dict[str, np.ndarray]]:
        if not self.prefetch:
            for i in plan:
                yield self._load(i)
            return
        q: queue.Queue = queue.Queue(maxsize=1)
        stop = threading.Event()

        def work():
            try:
                for i in plan:
                    if stop.is_set():
                        return
                    q.put(("ok", self._load(i)))
                q.put(("end", None))
            except BaseException as e:  # surfaced in the consumer thread
                q.put(("err", e))

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while True:
                kind, item = q.get()
                if kind == "end":
                    return
                if kind == "err":
                    raise item
                yield item
        finally:
            stop.set()

    def _rows_to_batch(self, arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
        out = {
            "targets": torch.from_numpy(arrays["targets"][rows].astype(np.int64)),
            "loss_mask": torch.from_numpy(arrays["loss_mask"][rows].astype(np.bool_)),
            "rate": torch.from_numpy(arrays["rate"][rows].astype(np.float32)),
        }
        if self.layer is None:
            out["x"] = torch.from_numpy(arrays["ids"][rows].astype(np.int64))
        else:
            out["x"] = from_storage(arrays["h"][rows], self.layer["dtype"]).float()
        return out

    def epoch_batches(self, epoch: int, skip: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch, skipping the first ``skip`` without reading their shards."""
        order = self._order(epoch)
        B, W = self.batch_size, self.world
        # global row positions of each shard in this epoch's sequence
        starts = np.cumsum([0] + [len(r) for _, r in order])
        first_row, end_row = skip * B * W, (self.steps_per_epoch * B * W if self.shuffle else starts[-1])
        mine = []
        for k in range(len(order)):
            pos = np.arange(starts[k], starts[k + 1])
            # global batch g = positions [g*B*W, (g+1)*B*W); this rank owns the r-th block of B in each
            keep = (pos >= first_row) & (pos < end_row) & ((pos // B) % W == self.rank)
            mine.append(order[k][1][keep])
        plan = [k for k in range(len(order)) if len(mine[k])]
        pending: list[dict[str, torch.Tensor]] = []
        pending_rows = 0
        made = skip
        for k, arrays in zip(plan, self._shard_iter([order[k][0] for k in plan])):
            rows = mine[k]
            while len(rows):
                take = min(B - pending_rows, len(rows))
                pending.append(self._rows_to_batch(arrays, rows[:take]))
                pending_rows += take
                rows = rows[take:]
                if pending_rows == B:
                    yield {key: torch.cat([p[key] for p in pending]) for key in pending[0]}
                    pending, pending_rows = [], 0
                    made += 1
                    if self.shuffle and made >= self.steps_per_epoch:
                        return
        if pending and not self.shuffle:
            yield {key: torch.cat([p[key] for p in pending]) for key in pending[0]}

    def shard_batches(self, indices: list[int], max_rows: int | None = None
                      ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """``(shard index, batch)`` for the given shards in order, a shard split into batches of ``max_rows``."""
        for i, arrays in zip(indices, self._shard_iter(list(indices))):
            rows = np.arange(self.views["shards"][i]["rows"])
            step = max_rows or len(rows)
            for lo in range(0, len(rows), step):
                yield i, self._rows_to_batch(arrays, rows[lo:lo + step])

    def shards_read(self, start_step: int, n_steps: int) -> set[int]:
        """Indices of the shards holding rows of global batches ``start_step .. start_step + n_steps - 1`` (every
        rank's rows, in this stream's shuffled order): what a stage reading those batches needs from a cache."""
        if not self.shuffle:
            raise ValueError("shards_read() follows the shuffled batch order; this stream does not shuffle")
        gb, spe, n = self.batch_size * self.world, self.steps_per_epoch, len(self.views["shards"])
        out: set[int] = set()
        step, end = start_step, start_step + n_steps
        while step < end and len(out) < n:
            epoch, skip = divmod(step, spe)
            stop = min(end - epoch * spe, spe)
            order = self._order(epoch)
            starts = np.cumsum([0] + [len(r) for _, r in order])
            lo, hi = skip * gb, stop * gb
            out.update(i for k, (i, _) in enumerate(order) if starts[k] < hi and starts[k + 1] > lo)
            step = (epoch + 1) * spe
        return out

    @property
    def n_shards(self) -> int:
        return len(self.views["shards"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        """Endless (shuffle) or single-pass (no shuffle) stream starting at ``start_step``."""
        if not self.shuffle:
            yield from self.epoch_batches(0)
            return
        epoch, skip = divmod(self.start_step, self.steps_per_epoch)
        while True:
            yield from self.epoch_batches(epoch, skip)
            epoch, skip = epoch + 1, 0
