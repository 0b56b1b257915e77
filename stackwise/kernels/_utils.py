# SPDX-License-Identifier: MIT
"""Shared helpers of the kernel package: input checks, backend choice, optional Triton import.

Dispatch rule (ARCHITECTURE.md): Triton on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1``
(Triton's interpreter, which is how CI tests the kernels); the torch path otherwise.
"""

from __future__ import annotations

import functools
import os

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """True when ``import triton`` works (it is an optional extra)."""
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(backend: str, device: torch.device) -> str:
    """Resolve ``backend`` ("auto" | "triton" | "torch") for tensors on ``device``.

    Raises:
        ValueError: unknown backend name.
        RuntimeError: "triton" forced where it cannot run (no triton, or CPU without TRITON_INTERPRET=1).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    can_triton = triton_available() and (device.type == "cuda" or (device.type == "cpu" and interpreting()))
    if backend == "auto":
        return "triton" if can_triton else "torch"
    if backend == "triton" and not can_triton:
        why = "triton is not installed (pip install stackwise[triton])" if not triton_available() else (
            f"tensors are on {device.type}; Triton runs on CUDA, or on CPU only with TRITON_INTERPRET=1 set "
            "before stackwise is imported"
        )
        raise RuntimeError(f"backend='triton' was requested but {why}; use backend='torch' or 'auto'")
    return backend


def _check_tensor(name: str, x: object, ndim: int = 4) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims [B, H, T, D], got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} dtype must be float32, bfloat16 or float16, got {x.dtype}")
    return x


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Validate q [B, H, T, Dqk], k [B, Hkv, S, Dqk], v [B, Hkv, S, Dv] for every attention op.

    Raises:
        TypeError: a non-tensor argument.
        ValueError: wrong rank, dtype, device, or incompatible shapes; the message names the argument.
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    B, H, T, D = q.shape
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"batch size of k {k.shape[0]} / v {v.shape[0]} must equal q's {B}")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"k and v must have the same number of heads, got k {k.shape[1]}, v {v.shape[1]}")
    Hkv = k.shape[1]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of k/v heads ({Hkv}) for GQA")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same length, got k {k.shape[2]}, v {v.shape[2]}")
    if k.shape[3] != D:
        raise ValueError(f"k head dim ({k.shape[3]}) must equal q head dim ({D})")
    if T == 0 or k.shape[2] == 0:
        raise ValueError(f"sequence length must be >= 1, got q {T}, k {k.shape[2]}")
