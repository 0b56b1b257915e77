# SPDX-License-Identifier: MIT
"""The config tree's shared pieces: enum tuples, :class:`ConfigError` and the validators every section uses."""

from __future__ import annotations

import difflib
from typing import Any

ATTENTION_TYPES = ("standard", "gqa", "mla", "kernel")
ATTENTION_MODES = ("bidirectional", "causal")
FINE_TUNE_MODES = ("clm", "mlm", "diffusion")
KERNEL_FEATURE_MAPS = ("softmax", "trig")
KERNEL_FAMILIES = ("gaussian", "orthogonal", "laplacian")
KERNEL_BACKENDS = ("auto", "triton", "torch")
MLP_PROJECTIONS = ("gate", "up", "down")
DTYPES = ("float32", "bfloat16", "float16")
BACKENDS = ("single", "deepspeed", "fsdp")


class ConfigError(ValueError):
    """A configuration value, key or file is invalid; the message names the field and the fix."""


def _one_of(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{name} must be one of {list(choices)}, got {value!r}{hint}")


def _in_range(name: str, value: float, lo: float | None = None, hi: float | None = None, *, lo_open=False) -> None:
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ConfigError(f"{name} must be <= {hi}, got {value}")
