# SPDX-License-Identifier: MIT
"""The layer-wise engine: stage trainer, checkpoints, fusion, fine-tuning, evaluation (and, per backend,
the distributed setup). Launchers are thin wrappers over these functions."""

from .checkpoint import CheckpointError, load_fused, load_model
from .finetune import fine_tune
from .fuse import fuse
from .trainer import train_all, train_stage

__all__ = ["CheckpointError", "fine_tune", "fuse", "load_fused", "load_model", "train_all", "train_stage"]
