# SPDX-License-Identifier: MIT
"""Logging for StackWise: one ``stackwise`` logger, rank-aware, a fixed progress-line format, metrics.jsonl.

Non-zero ranks log WARNING and above unless ``STACKWISE_LOG_RANKS=all``. Progress bars (tqdm) appear
only on rank 0 and only when stderr is a terminal, so log files stay clean.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

logger = logging.getLogger("stackwise")
_warned: set[str] = set()


class _CurrentStderr(logging.StreamHandler):
    """A handler that writes to ``sys.stderr`` as it is at each record, not as it was at the first
    ``init_logging``: notebooks, test runners and ``contextlib.redirect_stderr`` swap the stream, and a handler
    holding the old one writes to a closed or forgotten file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ and setStream assign it; the current stderr always wins
        pass


def init_logging(rank: int = 0) -> logging.Logger:
    if not getattr(logger, "_stackwise_init", False):
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter(f"[stackwise r{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
                                               "%H:%M:%S"))
        logger.addHandler(handler)
        logger.propagate = False
        logger._stackwise_init = True
    all_ranks = os.environ.get("STACKWISE_LOG_RANKS", "") == "all"
    logger.setLevel(logging.INFO if rank == 0 or all_ranks else logging.WARNING)
    return logger


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        logger.warning(msg)


def progress_bar(total: int, desc: str, rank: int = 0):
    """A tqdm bar on rank 0 when stderr is a TTY, else None (callers then rely on log lines)."""
    if rank != 0 or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def format_step(step: int, total: int, layer: int | str, loss: float, lr: float, gnorm: float, ms: float,
                tok_s: float, mem_gib: float | None = None, mfu: float | None = None) -> str:
    """``step 120/2000 | layer 05 | loss 3.2141 | lr 3.00e-04 | gnorm 0.84 | 412 ms | 158k tok/s | mfu 38.2% | mem ..``"""
    lay = f"{layer:02d}" if isinstance(layer, int) else str(layer)
    parts = [f"step {step}/{total}", f"layer {lay}", f"loss {loss:.4f}", f"lr {lr:.2e}", f"gnorm {gnorm:.2f}",
             f"{ms:.0f} ms", f"{tok_s / 1000:.1f}k tok/s"]
    if mfu is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    if mem_gib is not None:
        parts.append(f"mem {mem_gib:.1f} GiB")
    return " | ".join(parts)


class MetricsWriter:
    """Appends one JSON object per line to ``<run>/metrics.jsonl`` (rank 0 only)."""

    def __init__(self, run_dir: str, rank: int = 0):
        self.path = os.path.join(run_dir, "metrics.jsonl") if rank == 0 else None

    def write(self, **record) -> None:
        if self.path is None:
            return
        record.setdefault("time", round(time.time(), 3))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
