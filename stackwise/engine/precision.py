# SPDX-License-Identifier: MIT
"""``train.dtype`` on the single backend: autocast with float32 master weights, and a gradient scaler for float16.

- float32: plain float32 math.
- bfloat16: forward and backward run under ``torch.autocast`` (CPU or CUDA); parameters, gradients and AdamW
  state stay float32, so checkpoints are float32 and the optimizer update keeps full precision.
- float16 (CUDA only): autocast plus ``torch.amp.GradScaler``, whose dynamic loss scale keeps small gradients
  from flushing to zero; a step whose gradients overflow is skipped by the scaler.

The distributed backends get the same dtype from their own mechanisms (DeepSpeed's ``bf16``/``fp16`` sections,
FSDP2's ``MixedPrecisionPolicy``).
"""

from __future__ import annotations

import contextlib
import math

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Precision:
    """Autocast, backward and the clipped optimizer step for one ``train.dtype`` on one device."""

    def __init__(self, dtype: str, device: torch.device):
        if dtype not in _DTYPES:
            raise ValueError(f"train.dtype must be one of {list(_DTYPES)}, got {dtype!r}")
        if dtype == "float16" and device.type != "cuda":
            raise ValueError(f"train.dtype=float16 needs a CUDA device (got {device}); use bfloat16 or float32 on CPU")
        self.dtype, self.device = _DTYPES[dtype], device
        self.scaler = torch.amp.GradScaler("cuda") if dtype == "float16" else None

    def autocast(self):
        """Context for the forward pass (and the loss): a no-op in float32."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grad_clip: float) -> torch.Tensor:
        """Unscale (float16), clip the global norm to ``grad_clip`` (0 = no clipping), step, zero; returns the norm."""
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        gnorm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return gnorm
