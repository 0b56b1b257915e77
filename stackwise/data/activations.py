# SPDX-License-Identifier: MIT
"""The activation store: masked views and cached layer outputs on disk, sharded, verified.

Layout under ``<run>/acts/``:

    views_<split>/   shard_00000.ids.npy  .targets.npy  .loss_mask.npy  .rate.npy   + manifest.json
    layer_<K>/<split>/ shard_00000.h.npy                                            + manifest.json

A *view* is a training sequence with a diffusion mask drawn once (``objective.mask_draws`` views per
sequence): masked ids, targets, loss mask, mask rate. Every stage trains on the same views; ``layer_K``
holds the outputs of layers 0..K for those views, row-aligned with the view shards, so stage K+1 reads
``layer_K`` + views. Each array is written to a temp name, fsynced and renamed; the manifest, written last,
lists every file with its hash name (``blake3``; ``sha256`` in manifests written before), digest and shape.

Verification: a shard file is read once, in blocks into one buffer, each block hashed as it arrives (the
kernel is asked to read the whole file ahead, so the disk streams while the CPU hashes); the array is then a
view of that same buffer, so the bytes used are exactly the bytes hashed, with no second pass and no copy.
A mismatch or a missing manifest is refused with the file's name. BLAKE3 hashes at several GB/s per core,
so verified reads run at disk speed (benchmarks/RESULTS.md, ``layerwise_bench.py --cases io``).

The streaming reader, :class:`ShardStream`, lives in :mod:`stackwise.data.stream` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil

import numpy as np
import torch

from .._fs import atomic_write_bytes, fsync_dir

MANIFEST = "manifest.json"
FORMAT = "stackwise-acts-1"
# the hash new shards are written with; manifests name theirs per file, and sha256 ones still verify
HASH = "blake3"
HASHES = ("blake3", "sha256")
# bytes read (and hashed) per readinto call
_BLOCK = 4 << 20
log = logging.getLogger("stackwise")
# numpy has no bfloat16: such arrays are stored as their uint16 bit patterns
_NP_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ActivationCacheError(RuntimeError):
    """A cache directory, manifest or shard is missing or corrupt; the message names it and the fix."""


def _blake3():
    try:
        from blake3 import blake3
    except ImportError:
        return None
    return blake3


def new_hasher(name: str):
    """A hashlib-like object (``update``, ``hexdigest``) for a manifest hash name: ``blake3`` or ``sha256``."""
    if name == "sha256":
        return hashlib.sha256()
    if name == "blake3":
        b3 = _blake3()
        if b3 is None:
            raise ActivationCacheError("this activation cache is verified with BLAKE3, but the blake3 package is not "
                                       "installed; run: pip install blake3==1.0.11 (or pip install -e .)")
        return b3()
    raise ActivationCacheError(f"unknown shard hash {name!r} in a manifest (known: {list(HASHES)}); delete the "
                               f"cache directory and rerun the stage that writes it")


def write_hash() -> str:
    """The hash new shards get: BLAKE3, or SHA-256 (logged once) where the blake3 package is missing."""
    if HASH == "blake3" and _blake3() is None:
        if not getattr(write_hash, "warned", False):
            write_hash.warned = True
            log.warning("blake3 is not installed: activation shards are hashed with sha256, and verified reads run "
                        "at about 40%% of disk speed; run pip install blake3==1.0.11")
        return "sha256"
    return HASH


def hash_bytes(name: str, data) -> str:
    """Hex digest of ``data`` (bytes-like) with hash ``name``."""
    h = new_hasher(name)
    h.update(data)
    return h.hexdigest()


def entry_hash(entry: dict) -> tuple[str, str]:
    """``(hash name, hex digest)`` of a manifest file entry: ``{"hash", "digest"}``, or the older ``{"sha256"}``."""
    if "hash" in entry:
        return entry["hash"], entry["digest"]
    return "sha256", entry["sha256"]


def set_entry_digest(entry: dict, data) -> None:
    """Re-hash a manifest file entry for ``data`` with the entry's own hash (tools and tests that edit shards)."""
    name, _ = entry_hash(entry)
    entry["digest" if "hash" in entry else "sha256"] = hash_bytes(name, data)


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
            algo = write_hash()
            files[name] = {"file": fname, "hash": algo, "digest": hash_bytes(algo, data), "shape": list(a.shape),
                           "dtype": str(a.dtype)}
        self.shards.append({"rows": rows.pop(), "files": files, "index": idx})

    def skip(self, rows: int, index: int) -> None:
        """Record shard ``index`` (``rows`` rows) as not cached: an entry with no files keeps the set row-aligned
        with its views, and a reader that reaches it is refused with the fix (see :class:`ShardStream`)."""
        self.shards.append({"rows": rows, "files": {}, "index": index})

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


def _read_verified(path: str, name: str, want: str, directory: str) -> np.ndarray:
    """The bytes of ``path`` as a uint8 array, each block hashed as it is read; refused unless the digest matches."""
    h = new_hasher(name)
    try:
        with open(path, "rb", buffering=0) as f:
            size = os.fstat(f.fileno()).st_size
            if hasattr(os, "posix_fadvise"):
                # start reading the whole file now: the disk streams while the blocks below are hashed
                os.posix_fadvise(f.fileno(), 0, size, os.POSIX_FADV_WILLNEED)
            buf = np.empty(size, np.uint8)
            view = memoryview(buf)
            got = 0
            while got < size:
                n = f.readinto(view[got:got + _BLOCK])
                if not n:
                    break
                h.update(view[got:got + n])
                got += n
    except OSError as e:
        raise ActivationCacheError(f"activation shard {path} is unreadable ({e}); delete {directory} and rerun "
                                   f"the stage that writes it") from None
    if got != size or h.hexdigest() != want:
        raise ActivationCacheError(
            f"activation shard {path} failed its checksum (corrupt or modified); delete {directory} and rerun "
            f"the stage that writes it"
        )
    return buf


def _parse_npy(buf: np.ndarray) -> np.ndarray:
    """The array of an .npy file held in ``buf``: a view of it (no copy). Raises ValueError on anything but a
    plain numeric array (object arrays would need unpickling)."""
    head = io.BytesIO(buf[:min(len(buf), 1 << 16)].tobytes())
    version = np.lib.format.read_magic(head)
    if version not in ((1, 0), (2, 0)):
        raise ValueError(f".npy format version {version} (expected 1.0 or 2.0)")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(head)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    if head.tell() + count * dtype.itemsize != len(buf):
        raise ValueError(f"{len(buf) - head.tell()} data bytes for shape {shape} of {dtype}")
    a = np.frombuffer(buf, dtype=dtype, count=count, offset=head.tell())
    return a.reshape(shape[::-1]).T if fortran else a.reshape(shape)


def read_shard_array(directory: str, entry: dict) -> np.ndarray:
    """Read one array file of a shard, verified: hashed block by block as read, parsed from the same bytes."""
    path = os.path.join(directory, entry["file"])
    name, want = entry_hash(entry)
    buf = _read_verified(path, name, want, directory)
    try:
        a = _parse_npy(buf)
    except ValueError as e:  # not an .npy file, or an object array that would need unpickling
        raise ActivationCacheError(f"activation shard {path} is not a plain numeric .npy array ({e}); delete "
                                   f"{directory} and rerun the stage that writes it") from None
    if list(a.shape) != entry["shape"]:
        raise ActivationCacheError(f"activation shard {path} has shape {list(a.shape)}, manifest says {entry['shape']}")
    return a


def load_shard(directory: str, manifest: dict, i: int) -> dict[str, np.ndarray]:
    if not manifest["shards"][i]["files"]:  # see ShardWriter.skip
        raise ActivationCacheError(f"shard {i} of {directory} was not cached (engine.cache_rows=read keeps the rows "
                                   f"later stages were planned to read); a stage with another batch size, world size "
                                   f"or split rebuilds its input cache when it starts, or set engine.cache_rows=all")
    return {name: read_shard_array(directory, e) for name, e in manifest["shards"][i]["files"].items()}


def build_views(directory: str, sequences, *, objective, draws: int, seed: int, shard_rows: int,
                progress=None, meta: dict | None = None) -> dict:
    """Draw ``draws`` masked views per sequence with ``objective`` and write them as shards.

    Args:
        sequences: a dataset of LongTensor[T] (dummy or token windows).
        objective: the :class:`~stackwise.objective.Objective` whose ``mask(ids, generator)`` draws each batch's
            masks (the stages' diffusion policy); the stored ``rate`` is each view's realised mask rate.
        progress: optional callable(n_done, n_total) for progress reporting.
        meta: more fields for the manifest (e.g. how the sequences were chosen).
    """
    g = torch.Generator().manual_seed(seed)
    writer = ShardWriter(directory, "views")
    n = len(sequences)
    total = n * draws
    buf: list[torch.Tensor] = []
    done = 0

    def flush(batch: list[torch.Tensor]):
        v = objective.mask(torch.stack(batch), g)
        writer.add({"ids": v["x"].numpy().astype(np.int32), "targets": v["targets"].numpy().astype(np.int32),
                    "loss_mask": v["loss_mask"].numpy().astype(np.uint8), "rate": v["rate"].numpy().astype(np.float32)})

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
    return writer.close({"seed": seed, "draws": draws, "sequences": n, "seq_len": seq_len,
                         "policy": objective.policy, "mask_id": objective.mask_id,
                         "mask_fraction_min": objective.mask_fraction_min,
                         "mask_fraction_max": objective.mask_fraction_max, **(meta or {})})


def views_fingerprint(views_manifest: dict) -> str:
    """Identifies a view set (used to check a layer cache was built from these views)."""
    h = hashlib.sha256()
    for s in views_manifest["shards"]:
        for name in sorted(s["files"]):
            h.update(entry_hash(s["files"][name])[1].encode())
    return h.hexdigest()


def __getattr__(name: str):
    """``ShardStream`` lives in :mod:`.stream` (which imports this module); it stays importable from here."""
    if name == "ShardStream":
        from .stream import ShardStream

        return ShardStream
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["ActivationCacheError", "ShardWriter", "build_views", "entry_hash", "from_storage",
           "hash_bytes", "load_shard", "merge_shard_entries", "new_hasher", "read_manifest", "read_shard_array",
           "retired_dir", "set_entry_digest", "staging_dir", "to_storage", "views_fingerprint"]
