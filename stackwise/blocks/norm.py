# SPDX-License-Identifier: MIT
"""RMSNorm and rotary position embeddings (RoPE).

RoPE uses the rotate-half convention (Su et al. 2021 "RoFormer"; the layout of Hugging Face Llama):
the first and second halves of the head dim form the rotated pairs. Interop code converts interleaved
layouts (Meta's original Llama, DeepSeek-V2) at load time.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in float32 and returned in the input dtype (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Rotary embedding tables for ``dim`` rotated channels and positions [0, max_seq_len).

    The tables are non-persistent buffers (rebuilt from ``theta``, never stored in checkpoints).
    """

    def __init__(self, dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"RoPE dim must be even, got {dim}")
        self.dim, self.max_seq_len, self.theta = dim, max_seq_len, theta
        cos, sin = self._tables(torch.device("cpu"))
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, dtype=torch.float64, device=device) / self.dim))
        t = torch.arange(self.max_seq_len, dtype=torch.float64, device=device)
        freqs = torch.outer(t, inv_freq)  # [T, dim/2]
        return freqs.cos().float(), freqs.sin().float()

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Rotate x [B, H, T, dim] for positions start_pos .. start_pos + T - 1."""
        T = x.shape[-2]
        if start_pos + T > self.max_seq_len:
            raise ValueError(
                f"sequence positions up to {start_pos + T} exceed model.max_seq_len ({self.max_seq_len}); "
                f"raise model.max_seq_len"
            )
        if self.cos.is_meta:
            return x
        cos = self.cos[start_pos : start_pos + T].to(x.device)
        sin = self.sin[start_pos : start_pos + T].to(x.device)
        xf = x.float()
        x1, x2 = xf[..., : self.dim // 2], xf[..., self.dim // 2 :]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
