# SPDX-License-Identifier: MIT
"""Deterministic, per-tensor seeding: every weight is drawn from a seed derived from (init seed, layer, name).

This is what lets a frozen projection be stored as its seed and regenerated bit-identically, and lets
stage k build layer k alone (or under ``deepspeed.zero.Init``) and get the same initial weights as a
model built whole. Draws happen on a CPU generator in float32, then are copied to the parameter's device.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from any printable parts (same on every platform and Python version)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def seeded_normal_(param: torch.Tensor, std: float, *parts: object) -> torch.Tensor:
    """Fill ``param`` in place with N(0, std^2) drawn from ``derive_seed(*parts)``; a no-op on meta tensors."""
    if param.is_meta:
        return param
    g = torch.Generator(device="cpu").manual_seed(derive_seed(*parts))
    # one fp32 temporary (scaled in place): a 70B-shaped SwiGLU matrix is ~0.9 GB
    values = torch.randn(param.shape, generator=g, dtype=torch.float32).mul_(std)
    with torch.no_grad():
        param.copy_(values.to(device=param.device, dtype=param.dtype))
    return param
