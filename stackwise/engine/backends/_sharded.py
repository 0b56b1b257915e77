# SPDX-License-Identifier: MIT
"""What the two sharded backends (DeepSpeed ZeRO-3, FSDP2) share: a resumable-state directory of tagged
checkpoints (``step000120``) with ``world.json``, pruning of older tags, and a per-rank sharding report."""

from __future__ import annotations

import os
import shutil

from ..distributed import barrier
from ..log import logger
from . import StageBackend


class ShardedBackend(StageBackend):
    def _tag(self, step: int) -> str:
        return f"step{step:06d}"

    def _prune(self, keep: str) -> None:
        barrier()
        if self.env.is_main:
            for name in os.listdir(self.state_path):
                p = os.path.join(self.state_path, name)
                if os.path.isdir(p) and name != keep:
                    shutil.rmtree(p, ignore_errors=True)
        barrier()

    def _prepare_dir(self) -> None:
        if self.env.is_main:
            os.makedirs(self.state_path, exist_ok=True)
        barrier()

    def local_elements(self) -> int:
        raise NotImplementedError

    def log_sharding(self) -> None:
        full = self.counts()[1]
        local = self.local_elements()
        logger.info("%s: rank %d holds %s of the stage's %s parameter elements (%.1f%%)", self.name, self.env.rank,
                    f"{local:,}", f"{full:,}", 100.0 * local / max(full, 1))
