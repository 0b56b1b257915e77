# SPDX-License-Identifier: MIT
"""What a backend trains: a stage's ``StackWiseLM``, the layers it runs and the objective its loss comes from.

A stage k > 0 reads layer k-1's outputs ``h [B, T, C]``; stage 0, the end-to-end baseline and fine-tuning read
token ids ``[B, T]`` and run the embeddings first. ``forward`` returns the objective's loss divided by ``denom``
(the data-parallel loop passes the global normaliser over the world size, so the mean of the ranks' gradients
is the gradient of the global loss).
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import StackWiseLM
from ..objective import Objective


def run_stage_layers(model: StackWiseLM, h: torch.Tensor, layers: list[int], attention_mode: str,
                     checkpointing: bool = False) -> torch.Tensor:
    """h [B, T, C] through ``layers``; with ``checkpointing`` each block's activations are recomputed in backward."""
    if not checkpointing:
        return model.run_layers(h, layers[0], layers[-1] + 1, attention_mode)
    for k in layers:
        h = torch.utils.checkpoint.checkpoint(model.run_layers, h, k, k + 1, attention_mode, use_reentrant=False)
    return h


class StageModule(nn.Module):
    """One trainable unit (a stage, the whole model end to end, a fine-tune) whose forward returns the loss.

    Args:
        lm: the model holding (at least) ``layers`` and the embeddings/head.
        layers: consecutive layer indices this unit runs.
        objective: masking policy, weights, loss and attention mode.
        checkpointing: recompute each block's activations in backward (``engine.activation_checkpointing``).
        lr_scale: multipliers of the scheduled learning rate by parameter name (the backend groups by them).
        top: blocks run after ``layers`` and before the head (``train.global_head``); their output is not
            ``hidden``'s (caches hold the stage layers' outputs), only ``logits`` see them.
    """

    def __init__(self, lm: StackWiseLM, layers: list[int], objective: Objective, checkpointing: bool = False,
                 lr_scale: dict[str, float] | None = None, top: list[int] | None = None):
        super().__init__()
        self.lm, self.layers, self.objective, self.checkpointing = lm, list(layers), objective, checkpointing
        self.top = list(top or [])
        # learning-rate multipliers by parameter name (e.g. an earlier layer updated more gently); 1 when absent
        self.lr_scale = dict(lr_scale or {})

    @property
    def model_cfg(self):
        return self.lm.cfg

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x: ids [B, T] (when the unit starts at layer 0) or h [B, T, C] -> h [B, T, C] after its layers."""
        h = self.lm.embed(x) if self.layers[0] == 0 else x
        ckpt = self.checkpointing and torch.is_grad_enabled()
        return run_stage_layers(self.lm, h, self.layers, self.objective.attention_mode, ckpt)

    def _top(self, x: torch.Tensor) -> torch.Tensor:
        """x (ids [B, T] or h [B, T, C]) -> what the head reads: h after the unit's layers (and the top)."""
        h = self.hidden(x)
        if self.top:
            h = run_stage_layers(self.lm, h, self.top, self.objective.attention_mode,
                                 self.checkpointing and torch.is_grad_enabled())
        return h

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x (ids [B, T] or h [B, T, C]) -> logits [B, T, V] after the unit's layers (, the top) and the head."""
        return self.lm.head(self._top(x))

    def forward(self, x: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor,
                denom: torch.Tensor | float | None = None) -> torch.Tensor:
        # the head runs only where the objective scores a position (Objective.head_loss)
        return self.objective.head_loss(self._top(x), self.lm.head, targets, loss_mask, denom)
