# SPDX-License-Identifier: MIT
"""SwiGLU feed-forward with frozen, seeded random gate/up projections (Shazeer 2020, "GLU Variants").

``down(silu(gate(x)) * up(x))``. The projections named in ``ModelConfig.frozen_mlp`` (gate and up by
default) are random matrices drawn from ``derive_seed(init_seed, layer, name)`` with std 1/sqrt(fan_in),
kept at ``requires_grad=False`` and never handed to an optimizer. Checkpoints store the seed, not the
matrices (:meth:`SwiGLU.seeded_names`); :meth:`SwiGLU.regenerate_frozen` redraws them bit-identically.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ._init import seeded_normal_


class SwiGLU(nn.Module):
    """SwiGLU MLP of layer ``layer_idx``: x [B, T, C] -> [B, T, C]."""

    NAMES = ("gate", "up", "down")

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.init_seed, self.init_std = layer_idx, cfg.init_seed, cfg.init_std
        self.n_layers = cfg.init_depth  # the depth its down projection is initialised for
        self.frozen = tuple(cfg.frozen_mlp)
        # frozen projections imported from elsewhere (e.g. Hugging Face) are real tensors, not seeds
        self.frozen_from_seed = cfg.frozen_mlp_seeded
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        for name in self.frozen:
            getattr(self, name).weight.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name in self.NAMES:
            w = getattr(self, name).weight
            if name in self.frozen and self.frozen_from_seed:
                std = 1.0 / math.sqrt(getattr(self, name).in_features)
                seeded_normal_(w, std, self.init_seed, self.layer_idx, f"mlp.{name}.frozen")
            else:
                # output projections scaled down with depth (GPT-2)
                std = self.init_std / math.sqrt(2 * self.n_layers) if name == "down" else self.init_std
                seeded_normal_(w, std, self.init_seed, self.layer_idx, f"mlp.{name}")

    def regenerate_frozen(self) -> None:
        """Redraw the frozen projections from their seed (after loading a checkpoint that stores seeds)."""
        if not self.frozen_from_seed:
            return
        for name in self.frozen:
            w = getattr(self, name).weight
            seeded_normal_(w, 1.0 / math.sqrt(getattr(self, name).in_features), self.init_seed, self.layer_idx, f"mlp.{name}.frozen")

    def seeded_names(self) -> list[str]:
        """Parameter names (relative to this module) that checkpoints store as a seed."""
        return [f"{n}.weight" for n in self.frozen] if self.frozen_from_seed else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))
