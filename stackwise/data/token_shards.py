# SPDX-License-Identifier: MIT
"""Token shards: text -> ``<data_dir>/<name>-v<vocab>/`` (tokenizer, train.bin, val.bin, meta.json), streamed.

``prepare_text_data(data_cfg, vocab_size)`` builds or reuses::

    tokenizer.json   byte-level BPE trained on the train split (or a copy of data.tokenizer); [MASK] = vocab_size-1
    train.bin        token ids, uint16 when vocab_size <= 65536 else uint32 (nanoGPT's layout: read with np.memmap)
    val.bin          held-out ids: the last data.val_fraction of every document (play, Bible book, ~8M-char chunk)
    meta.json        the request, dtype, token counts and the sha256 of every file; written last

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a complete-looking
directory; a later call reuses the directory only when meta.json matches the request and every checksum verifies.
Concurrent callers (several ranks) serialise on a lock file (``fcntl.flock``) and the later ones reuse the build.

Bounded memory at any corpus size: documents are read one at a time (:mod:`.corpora`), each train/val part is
cut into pieces of about ``_PIECE_CHARS`` characters, and batches of about ``_BATCH_CHARS`` characters are
encoded by the tokenizer's Rust thread pool (every core; ``RAYON_NUM_THREADS`` caps it) in a helper thread
while the next batch is read; ids are appended to the shard files as each batch finishes, in order. A piece
is cut only after a newline that sits between two printable ASCII characters, where the GPT-2 byte-level
pre-tokenizer always ends a pre-token, so the ids are exactly those of encoding each part whole. Tokenizers
with another pre-tokenizer, a normalizer or non-special added tokens are encoded one part at a time.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._fs import atomic_write, fsync_dir, tmp_name
from .corpora import _PACKAGES, DataError, TextSource, corpus_files, iter_documents, resolve_text_files, split_document
from .tokenizer import _tokenizers, load_tokenizer, train_tokenizer

log = logging.getLogger("stackwise")

FORMAT_VERSION = 1
# characters per encoded piece, and per encode_batch call for each encoding thread (clamped, see _batch_chars)
_PIECE_CHARS = 1 << 18
_BATCH_CHARS_PER_THREAD = 1 << 20
# a safe cut: after "\n" preceded and followed by a printable ASCII character (never inside a GPT-2 pre-token)
_CUT = re.compile(r"(?<=[!-~]\n)(?=[!-~])")


@dataclass
class TextData:
    """A built token-data directory: tokenizer, train/val shards and their sizes."""

    tokenizer_path: str
    train_path: str
    val_path: str
    vocab_size: int
    mask_id: int
    n_train_tokens: int
    n_val_tokens: int
    data_dir: str
    dtype: str = "uint16"
    description: str = ""


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65536 else np.uint32)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file read in 16 MiB blocks (about 1 GB/s: tens of MB verify in well under a second)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _progress(items: Iterable, desc: str, sources: list[TextSource]) -> Iterable:
    """A tqdm bar when stderr is a terminal, the bare iterable otherwise (logs stay clean)."""
    if not sys.stderr.isatty():
        return items
    from tqdm import tqdm

    # plays are one document per file; Bible books and chunks of user files have no known count
    total = len(sources) if all(s.kind == "play" for s in sources) else None
    return tqdm(items, desc=desc, total=total, unit="doc", leave=False)


def _request(data_cfg, vocab_size: int) -> tuple[str, list[TextSource], dict]:
    """Directory name, sources and the request dict that meta.json must match for a reuse."""
    if data_cfg.corpus and data_cfg.text_files:
        raise DataError(
            f"set one of data.corpus ({data_cfg.corpus!r}) or data.text_files ({list(data_cfg.text_files)}), "
            f"not both; clear the other"
        )
    if data_cfg.corpus:
        sources = corpus_files(data_cfg.corpus)
        packages = {_PACKAGES[p][1]: importlib.metadata.version(_PACKAGES[p][1]) for p in data_cfg.corpus.split("+")}
        source = {"corpus": data_cfg.corpus, "packages": packages, "files": len(sources)}
        name = data_cfg.corpus.replace("+", "-")
    elif data_cfg.text_files:
        field = getattr(data_cfg, "jsonl_field", "text")
        sources = resolve_text_files(data_cfg.text_files, field)
        # size and mtime stand in for content: editing a file gives a new directory
        files = [[str(s.path), s.path.stat().st_size, s.path.stat().st_mtime_ns] for s in sources]
        source = {"text_files": files}
        if any(s.kind == "jsonl" for s in sources):
            source["jsonl_field"] = field
        name = "text-" + hashlib.sha256(json.dumps(source if "jsonl_field" in source else files).encode()
                                        ).hexdigest()[:12]
    else:
        raise DataError("data.dummy is false but data.corpus and data.text_files are both empty; set data.corpus="
                        "shakespeare, or data.text_files=[my.txt], or data.dummy=true")
    tokenizer = "byte-level-bpe"
    if data_cfg.tokenizer:
        tok_path = os.path.abspath(os.path.expanduser(data_cfg.tokenizer))
        if not os.path.isfile(tok_path):
            raise DataError(f"data.tokenizer {data_cfg.tokenizer!r} does not exist; fix the path or set it to ''")
        tokenizer = {"path": tok_path, "sha256": file_sha256(tok_path)}
        name += "-tok" + tokenizer["sha256"][:8]
    request = {"format": FORMAT_VERSION, "source": source, "tokenizer": tokenizer, "vocab_size": vocab_size,
               "val_fraction": data_cfg.val_fraction}
    return f"{name}-v{vocab_size}", sources, request


def _valid_meta(out: Path, request: dict) -> dict | None:
    """meta.json when it matches ``request`` and every file it lists verifies; None (with a log line) otherwise."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        log.warning("rebuilding %s: meta.json is unreadable (%s)", out, e)
        return None
    if meta.get("request") != request:
        log.info("rebuilding %s: it was built for a different request", out)
        return None
    for entry in meta.get("files", {}).values():
        path = out / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"] or file_sha256(path) != entry["sha256"]:
            log.warning("rebuilding %s: %s is missing, truncated or corrupted", out, path.name)
            return None
    return meta


def _text_data(out: Path, meta: dict) -> TextData:
    files = meta["files"]
    return TextData(
        tokenizer_path=str(out / files["tokenizer"]["file"]), train_path=str(out / files["train"]["file"]),
        val_path=str(out / files["val"]["file"]), vocab_size=meta["vocab_size"], mask_id=meta["mask_id"],
        n_train_tokens=files["train"]["n_tokens"], n_val_tokens=files["val"]["n_tokens"], data_dir=str(out),
        dtype=meta["dtype"], description=meta["description"],
    )


def prepare_text_data(data_cfg, vocab_size: int) -> TextData:
    """Build (or reuse) the tokenizer and train/val token shards for ``data_cfg`` (a ``DataConfig``).

    Args:
        data_cfg: uses ``corpus`` or ``text_files``, ``tokenizer``, ``data_dir`` and ``val_fraction``.
        vocab_size: ``model.vocab_size``; a trained tokenizer has exactly this many ids, [MASK] the last.

    Returns:
        TextData describing ``<data_dir>/<name>-v<vocab_size>/``.

    Raises:
        DataError: no text configured, a missing package or file, a bad tokenizer, or no text to tokenize.
    """
    name, sources, request = _request(data_cfg, vocab_size)
    if data_cfg.tokenizer:
        # refuse a tokenizer without a mask token, or too big for the model, before creating anything
        load_tokenizer(request["tokenizer"]["path"], vocab_size=vocab_size)
    out = Path(data_cfg.data_dir).expanduser().resolve() / name
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        except ImportError:  # no POSIX locks: concurrent builders must be avoided by the caller
            pass
        meta = _valid_meta(out, request)
        if meta is None:
            meta = _build(out, sources, request, data_cfg, vocab_size)
        else:
            log.info("reusing token data %s (%s)", out, meta["description"])
    return _text_data(out, meta)


def _build(out: Path, sources: list[TextSource], request: dict, data_cfg, vocab_size: int) -> dict:
    # a directory without meta.json is incomplete by definition, so drop the old one first
    (out / "meta.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    what = data_cfg.corpus or f"{len(sources)} text file(s)"
    log.info("building token data for %s in %s (vocab %d)", what, out, vocab_size)
    vf = data_cfg.val_fraction
    tok_path = out / "tokenizer.json"
    if data_cfg.tokenizer:
        tok = load_tokenizer(request["tokenizer"]["path"], vocab_size=vocab_size)
        atomic_write(tok_path, lambda tmp: shutil.copyfile(tok.path, tmp))
        t_tok = 0.0
    else:
        train_parts = (split_document(d, vf)[0] for d in _progress(iter_documents(sources), "BPE", sources))
        tok = train_tokenizer(train_parts, vocab_size, tok_path)
        t_tok = time.perf_counter() - t0
        log.info("trained a %d-id byte-level BPE in %.1f s", vocab_size, t_tok)
    # shards never hold the mask id: the literal text "[MASK]" is encoded as ordinary text
    raw = _tokenizers().Tokenizer.from_file(str(tok_path))
    raw.encode_special_tokens = True
    dtype = token_dtype(vocab_size)
    counts = {"train": 0, "val": 0, "docs": 0, "bytes": 0}
    hashes = {"train": hashlib.sha256(), "val": hashlib.sha256()}
    tmp = {k: Path(tmp_name(out / f"{k}.bin")) for k in ("train", "val")}
    cuttable = _cuttable(raw)

    def pieces():
        for doc in _progress(iter_documents(sources), "tokenize", sources):
            counts["docs"] += 1
            counts["bytes"] += len(doc.encode("utf-8"))
            for split, part in zip(("train", "val"), split_document(doc, vf)):
                for piece in _pieces(part, cuttable):
                    yield split, piece

    try:
        with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
            handles = {"train": ftrain, "val": fval}
            for split, ids in encode_pieces(raw, pieces(), dtype):
                data = ids.tobytes()
                handles[split].write(data)
                hashes[split].update(data)
                counts[split] += len(ids)
            for f in handles.values():
                f.flush()
                os.fsync(f.fileno())
        if counts["train"] == 0:
            raise DataError(f"{what} holds no text to tokenize; point data.text_files at non-empty UTF-8 files")
        for k in ("train", "val"):
            os.replace(tmp[k], out / f"{k}.bin")
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    n_tok = counts["train"] + counts["val"]
    description = (f"{what}: {counts['train']:,} train + {counts['val']:,} val tokens, vocab {vocab_size}, "
                   f"{counts['bytes'] / n_tok:.2f} bytes/token")
    files = {"tokenizer": {"file": "tokenizer.json", "bytes": tok_path.stat().st_size, "sha256": file_sha256(tok_path)}}
    for k in ("train", "val"):
        files[k] = {"file": f"{k}.bin", "n_tokens": counts[k], "bytes": counts[k] * dtype.itemsize,
                    "sha256": hashes[k].hexdigest()}
    meta = {"request": request, "vocab_size": vocab_size, "mask_id": tok.mask_id, "mask_token": tok.mask_token,
            "dtype": dtype.name, "files": files, "n_documents": counts["docs"], "n_bytes": counts["bytes"],
            "bytes_per_token": counts["bytes"] / n_tok, "val_fraction": data_cfg.val_fraction,
            "description": description, "tokenizer_seconds": round(t_tok, 3),
            "build_seconds": round(time.perf_counter() - t0, 3), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(out / "meta.json", lambda p: Path(p).write_text(json.dumps(meta, indent=1)))
    fsync_dir(out)
    # encode_batch used the Rust thread pool: without this, forked DataLoader workers print a deadlock warning
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log.info("built %s in %.1f s: %s", out, meta["build_seconds"], description)
    return meta


def _cuttable(raw) -> bool:
    """Whether pieces cut at :data:`_CUT` encode to the ids of the whole text: a GPT-2 byte-level pre-tokenizer
    (regex on, no prefix space), no normalizer, and no added token that text could match."""
    spec = json.loads(raw.to_str())
    pre = spec.get("pre_tokenizer") or {}
    return (spec.get("normalizer") is None and pre.get("type") == "ByteLevel" and pre.get("use_regex", True)
            and not pre.get("add_prefix_space", False)
            and all(t.get("special", False) for t in spec.get("added_tokens") or []))


def _pieces(text: str, cuttable: bool) -> Iterator[str]:
    """``text`` in pieces of about ``_PIECE_CHARS`` characters, cut only at :data:`_CUT` (whole if not cuttable)."""
    start = 0
    if not text:
        return
    while cuttable and len(text) - start > _PIECE_CHARS:
        m = _CUT.search(text, start + _PIECE_CHARS)
        if m is None:
            break
        yield text[start:m.start()]
        start = m.start()
    yield text[start:]


def _batch_chars() -> int:
    """Characters per encode_batch call: 1 MiB per encoding thread, between 4 and 16 MiB (memory stays bounded:
    encodings take about 50 bytes per token)."""
    threads = int(os.environ.get("RAYON_NUM_THREADS") or 0) or os.cpu_count() or 1
    return min(16 << 20, max(4 << 20, threads * _BATCH_CHARS_PER_THREAD))


def encode_pieces(raw, items: Iterable[tuple[str, str]], dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """``(key, text)`` -> ``(key, ids)`` in order. Batches of about :func:`_batch_chars` characters are encoded on
    every core by the tokenizer's thread pool, in a helper thread, while the caller's iterator reads the next
    batch; at most two batches are in flight."""
    encode = getattr(raw, "encode_batch_fast", raw.encode_batch)  # no offsets: ~3x faster, less memory

    def run(batch: list[tuple[str, str]]) -> list[tuple[str, np.ndarray]]:
        encs = encode([t for _, t in batch], add_special_tokens=False)
        return [(key, np.asarray(e.ids, dtype=dtype)) for (key, _), e in zip(batch, encs)]

    limit = _batch_chars()
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    # encode_batch is serial when this is "false" (which a previous build in this process sets, for DataLoaders)
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    pending: deque = deque()
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="stackwise-tokenize") as pool:
            batch: list[tuple[str, str]] = []
            size = 0
            for key, text in items:
                batch.append((key, text))
                size += len(text)
                if size >= limit:
                    pending.append(pool.submit(run, batch))
                    batch, size = [], 0
                    while len(pending) > 1:
                        yield from pending.popleft().result()
            if batch:
                pending.append(pool.submit(run, batch))
            while pending:
                yield from pending.popleft().result()
    finally:
        for f in pending:
            f.cancel()
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous
