# SPDX-License-Identifier: MIT
"""The layer-wise engine: stage trainer, checkpoints, fusion, fine-tuning, evaluation (and, per backend,
the distributed setup). Launchers are thin wrappers over these functions."""

from .checkpoint import CheckpointError, load_fused, load_model
from .end_to_end import train_end_to_end
from .finetune import fine_tune
from .fuse import fuse
from .stages import train_all, train_stage

__all__ = ["CheckpointError", "fine_tune", "fuse", "load_fused", "load_model", "train_all", "train_end_to_end", "train_stage"]
