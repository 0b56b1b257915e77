# SPDX-License-Identifier: MIT
"""Durable file writes shared by every layer: write a temp file, fsync it, rename it over the target.

A crash leaves either the previous file or the complete new one, never a mix. Temp files are named
``<target>.tmp-<pid>`` so a later run can recognise (and remove) those of a process that died mid-write.
"""

from __future__ import annotations

import os
from collections.abc import Callable


def tmp_name(path: str | os.PathLike) -> str:
    return f"{os.fspath(path)}.tmp-{os.getpid()}"


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames inside ``directory`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(os.fspath(directory), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)``, fsync the result, rename it over ``path``; the temp file never survives an error."""
    path = os.fspath(path)
    tmp = tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
