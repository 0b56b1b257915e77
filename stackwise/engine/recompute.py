# SPDX-License-Identifier: MIT
"""``engine.cache=recompute``: rebuild stage k's inputs from the masked views with the frozen layers 0..k-1.

Instead of reading ``acts/layer_{k-1}/train`` from disk, every batch of ids goes through the embeddings
and the trained layers 0..k-1 again. The frozen layers live on the CPU (pinned when a GPU is used) and
visit the device one at a time: while layer i runs, layer i+1 is copied on a side CUDA stream
(prefetch), so device memory holds at most two frozen layers plus the stage being trained. On a CPU
device nothing moves. The recomputed inputs are float32 (the disk cache holds ``engine.cache_dtype``),
so a stage on recomputed inputs matches a stage on a float32 disk cache.

When each wins (measured numbers in the README): disk costs one write of the train split per layer
and one read per step; recompute costs k layer forwards per step at stage k (quadratic in depth over
a run) but no disk space for the train split. Recompute wins for shallow stacks, fast devices and slow or
small disks; disk wins for deep stacks and many epochs over the same views.
"""

from __future__ import annotations

import torch

from ..config import StackWiseConfig
from ..model import StackWiseLM
from . import checkpoint as ckpt
from .rundir import RunDir


class FrozenPrefix:
    """Embeddings + trained layers ``0..upto-1`` as a no-grad function ``ids [B, T] -> h [B, T, C]``."""

    def __init__(self, cfg: StackWiseConfig, run: RunDir, upto: int, device: torch.device):
        self.device, self.upto = device, upto
        self.attention_mode = cfg.model.attention.attention_mode
        self.model = StackWiseLM(cfg.model, layers=list(range(upto)))
        for k in range(upto):
            tensors, _ = ckpt.load_tensors(run.layer_ckpt(k))
            keep = {n: t for n, t in tensors.items() if n.startswith(f"layers.{k}.") or n == "tok_embeddings.weight"}
            ckpt.load_into(self.model, keep, run.layer_ckpt(k), strict=False)
        self.model.requires_grad_(False).eval()
        self.on_gpu = device.type == "cuda"
        if self.on_gpu:
            self.model.tok_embeddings.to(device)
            if self.model.rope is not None:
                self.model.rope.to(device)
            for k in range(upto):
                for p in self.model.layers[k].parameters():
                    p.data = p.data.pin_memory()
            self.copy_stream = torch.cuda.Stream(device)

    def _to_device(self, k: int):
        block = self.model.layers[k]
        return {n: p.data.to(self.device, non_blocking=True) for n, p in block.named_parameters()}

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed(ids.to(self.device))
        if not self.on_gpu:
            return self.model.run_layers(h, 0, self.upto, self.attention_mode)
        nxt = None
        with torch.cuda.stream(self.copy_stream):
            nxt = self._to_device(0) if self.upto else None
        for k in range(self.upto):
            torch.cuda.current_stream().wait_stream(self.copy_stream)
            cur = nxt
            if k + 1 < self.upto:
                with torch.cuda.stream(self.copy_stream):
                    nxt = self._to_device(k + 1)
            block = self.model.layers[k]
            host = {n: p.data for n, p in block.named_parameters()}
            for n, p in block.named_parameters():
                p.data = cur[n]
            h = self.model.run_layers(h, k, k + 1, self.attention_mode)
            for n, p in block.named_parameters():
                p.data = host[n]
        return h
