# SPDX-License-Identifier: MIT
"""The activation store: masked views and cached layer outputs on disk, sharded, verified, streamed.

Layout under ``<run>/acts/``:

    views_<split>/   shard_00000.ids.npy  .targets.npy  .loss_mask.npy  .rate.npy   + manifest.json
    layer_<K>/<split>/ shard_00000.h.npy                                            + manifest.json

A *view* is a training sequence with a diffusion mask drawn once (``objective.mask_draws`` views per
sequence): masked ids, targets, loss mask, mask rate. Every stage trains on the same views; ``layer_K``
holds the outputs of layers 0..K for those views, row-aligned with the view shards, so stage K+1 reads
``layer_K`` + views. Each array is written to a temp name, fsynced and renamed; the manifest, written last,
lists every file with its SHA-256 and shape. A shard is verified as it is read (one read, hashed and
parsed from the same bytes); a mismatch or a missing manifest is refused with the file's name.

Streaming (:class:`ShardStream`): batches come in a deterministic order that depends only on
(seed, epoch, step), so a resumed stage sees exactly the batches the uninterrupted run would have; a
background thread prefetches the next shard while the current one is consumed, and at most two shards
are in memory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import shutil
import threading
from collections.abc import Iterator

import numpy as np
import torch

from .._fs import atomic_write_bytes, fsync_dir

MANIFEST = "manifest.json"
FORMAT = "stackwise-acts-1"
# numpy has no bfloat16: such arrays are stored as their uint16 bit patterns
_NP_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationCacheError(RuntimeError):
    """A cache directory, manifest or shard is missing or corrupt; the message names it and the fix."""


def _atomic_write_bytes(path: str, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise ActivationCacheError(f"could not write {path}: {e}; free disk space and rerun the stage") from None


def to_storage(t: torch.Tensor, dtype: str) -> np.ndarray:
    """A CPU tensor as the numpy array stored on disk for ``dtype``."""
    t = t.detach().to("cpu", _TORCH[dtype]).contiguous()
    return t.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else t.numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


class ShardWriter:
    """Writes one shard set (a directory of row-aligned .npy arrays and a manifest).

    Use ``add(arrays)`` per shard, then ``close(meta)``. Shards go to a staging sibling
    ``<directory>.partial`` and ``close`` swaps it in (old set renamed to ``<directory>.old``, new set renamed
    in, old set deleted), so a rebuild that fails (disk full, crash) leaves the previous complete set in place
    and readers never see a half-written one; :func:`read_manifest` finishes a swap a crash interrupted.

    Data-parallel writing: one rank creates the staging directory (``fresh=True``), the others open it with
    ``fresh=False`` after a barrier; each adds its shards with their global ``index``; one rank calls
    ``close(meta, shards=...)`` with every rank's :attr:`shards` merged (see :func:`merge_shard_entries`).
    """

    def __init__(self, directory: str, kind: str, *, fresh: bool = True):
        self.directory, self.kind = directory, kind
        self.path = staging_dir(directory)
        if fresh:
            _recover(directory)
            # a staging directory left by a crashed or failed build is garbage: start it again
            if os.path.exists(self.path):
                shutil.rmtree(self.path)
            os.makedirs(self.path)
        elif not os.path.isdir(self.path):
            raise ActivationCacheError(f"{self.path} does not exist; the writing rank must create it first")
        self.shards: list[dict] = []

    def abort(self) -> None:
        """Delete the staging directory (the previous complete set, if any, is untouched)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def add(self, arrays: dict[str, np.ndarray], index: int | None = None) -> None:
        rows = {a.shape[0] for a in arrays.values()}
        if len(rows) != 1:
            raise ValueError(f"arrays of one shard must have the same number of rows, got {sorted(rows)}")
        idx = len(self.shards) if index is None else index
        files = {}
        for name, a in arrays.items():
            fname = f"shard_{idx:05d}.{name}.npy"
            buf = io.BytesIO()
            np.save(buf, a, allow_pickle=False)
            data = buf.getvalue()
            try:
                _atomic_write_bytes(os.path.join(self.path, fname), data)
            except ActivationCacheError:
                # free what the failed build used; the previous set at self.directory stays readable
                self.abort()
                raise
            files[name] = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "shape": list(a.shape),
                           "dtype": str(a.dtype)}
        self.shards.append({"rows": rows.pop(), "files": files, "index": idx})

    def close(self, meta: dict, shards: list[dict] | None = None) -> dict:
        """Write the manifest (last, atomically), then swap the staging directory in; ``shards`` defaults to
        this writer's own."""
        entries = merge_shard_entries([self.shards if shards is None else shards])
        manifest = {"format": FORMAT, "kind": self.kind, "rows": sum(s["rows"] for s in entries),
                    "shards": entries, **meta}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        try:
            fsync_dir(self.path)
            _atomic_write_bytes(os.path.join(self.path, MANIFEST), json.dumps(manifest, indent=1).encode())
        except (ActivationCacheError, OSError):
            self.abort()
            raise
        old = retired_dir(self.directory)
        if os.path.exists(old):
            shutil.rmtree(old)
        if os.path.exists(self.directory):
            os.rename(self.directory, old)
        os.rename(self.path, self.directory)
        fsync_dir(os.path.dirname(os.path.abspath(self.directory)))
        shutil.rmtree(old, ignore_errors=True)
        return manifest


def _manifest_digest(manifest: dict) -> str:
    """SHA-256 of a manifest's content without its own digest field (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def staging_dir(directory: str) -> str:
    """Where a :class:`ShardWriter` builds ``directory`` before swapping it in."""
    return directory.rstrip(os.sep) + ".partial"


def retired_dir(directory: str) -> str:
    """Where the previous set of ``directory`` sits for the instant of the swap."""
    return directory.rstrip(os.sep) + ".old"


def _recover(directory: str) -> None:
    """Finish a swap that a crash interrupted: a complete staging set whose target is missing is moved in."""
    new, old = staging_dir(directory), retired_dir(directory)
    if not os.path.exists(directory) and os.path.isfile(os.path.join(new, MANIFEST)):
        try:
            os.rename(new, directory)
        except OSError:  # another rank finished it first
            pass
    if os.path.exists(directory) and os.path.exists(old):
        shutil.rmtree(old, ignore_errors=True)


def merge_shard_entries(per_rank: list[list[dict]]) -> list[dict]:
    """Shard entries of several writers in index order, checking that indices are 0..n-1 exactly once."""
    entries = sorted((s for part in per_rank for s in part), key=lambda s: s["index"])
    if [s["index"] for s in entries] != list(range(len(entries))):
        raise ActivationCacheError(f"shard indices {[s['index'] for s in entries]} are not 0..{len(entries) - 1}")
    return [{"rows": s["rows"], "files": s["files"]} for s in entries]


def read_manifest(directory: str, *, what: str = "activation cache") -> dict:
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        _recover(directory)
    if not os.path.isfile(path):
        raise ActivationCacheError(
            f"{what} {directory} is missing or incomplete (no {MANIFEST}); it was never finished or was deleted: "
            f"rerun the stage that writes it"
        )
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError) as e:  # UnicodeDecodeError from a flipped byte is a ValueError too
        raise ActivationCacheError(f"{path} is unreadable ({e}); delete {directory} and rerun the stage") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        fmt = m.get("format") if isinstance(m, dict) else None
        raise ActivationCacheError(f"{path} has format {fmt!r}, expected {FORMAT!r}; delete {directory} and rerun "
                                   f"the stage that writes it")
    # a damaged manifest could still parse (a changed row count or shape): it carries its own checksum
    if m.get("manifest_sha256") != _manifest_digest(m):
        raise ActivationCacheError(f"{path} failed its checksum (corrupt or modified); delete {directory} and rerun "
                                   f"the stage that writes it")
    return m


def read_shard_array(directory: str, entry: dict) -> np.ndarray:
    """Read one array file of a shard, verifying its SHA-256 (hashed and parsed from the same bytes)."""
    path = os.path.join(directory, entry["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ActivationCacheError(f"activation shard {path} is unreadable ({e}); delete {directory} and rerun "
                                   f"the stage that writes it") from None
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ActivationCacheError(
            f"activation shard {path} failed its checksum (corrupt or modified); delete {directory} and rerun "
            f"the stage that writes it"
        )
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # not an .npy file, or an object array that would need unpickling
        raise ActivationCacheError(f"activation shard {path} is not a plain numeric .npy array ({e}); delete "
                                   f"{directory} and rerun the stage that writes it") from None
    if list(a.shape) != entry["shape"]:
        raise ActivationCacheError(f"activation shard {path} has shape {list(a.shape)}, manifest says {entry['shape']}")
    return a


def load_shard(directory: str, manifest: dict, i: int) -> dict[str, np.ndarray]:
    return {name: read_shard_array(directory, e) for name, e in manifest["shards"][i]["files"].items()}


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


def build_views(directory: str, sequences, *, draws: int, seed: int, mask_id: int, mask_fraction_min: float,
                mask_fraction_max: float, shard_rows: int, progress=None) -> dict:
    """Draw ``draws`` diffusion masks per sequence and write the views as shards.

    Args:
        sequences: a dataset of LongTensor[T] (dummy or token windows).
        progress: optional callable(n_done, n_total) for progress reporting.
    """
    from ..objective import diffusion_mask

    g = torch.Generator().manual_seed(seed)
    writer = ShardWriter(directory, "views")
    n = len(sequences)
    total = n * draws
    buf: list[torch.Tensor] = []
    done = 0

    def flush(batch: list[torch.Tensor]):
        ids = torch.stack(batch)
        masked, targets, lm, t = diffusion_mask(ids, g, mask_id=mask_id, mask_fraction_min=mask_fraction_min,
                                                mask_fraction_max=mask_fraction_max)
        writer.add({"ids": masked.numpy().astype(np.int32), "targets": targets.numpy().astype(np.int32),
                    "loss_mask": lm.numpy().astype(np.uint8), "rate": t.numpy().astype(np.float32)})

    for d in range(draws):
        for i in range(n):
            buf.append(sequences[i])
            if len(buf) == shard_rows:
                flush(buf)
                done += len(buf)
                buf = []
                if progress:
                    progress(done, total)
    if buf:
        flush(buf)
        if progress:
            progress(total, total)
    seq_len = int(sequences[0].shape[0]) if n else 0
    return writer.close({"seed": seed, "draws": draws, "sequences": n, "seq_len": seq_len, "mask_id": mask_id,
                         "mask_fraction_min": mask_fraction_min, "mask_fraction_max": mask_fraction_max})


def views_fingerprint(views_manifest: dict) -> str:
    """Identifies a view set (used to check a layer cache was built from these views)."""
    h = hashlib.sha256()
    for s in views_manifest["shards"]:
        for name in sorted(s["files"]):
            h.update(s["files"][name]["sha256"].encode())
    return h.hexdigest()
