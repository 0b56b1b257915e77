# SPDX-License-Identifier: MIT
"""PyTorch FSDP2 backend: ``fully_shard`` on every block of the unit and on the root (embeddings, final norm,
head), ``MixedPrecisionPolicy`` for ``train.dtype``, torch AdamW on the sharded (DTensor) parameters, optional
``train.compile`` of the blocks. Resume state is a ``torch.distributed.checkpoint`` directory per tag under
``state_path`` with a ``latest`` pointer and ``world.json``.
"""

from __future__ import annotations

import gc
import os

import torch

from ..distributed import barrier, broadcast_object
from ._sharded import ShardedBackend
from . import param_groups

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FSDPBackend(ShardedBackend):
    name = "fsdp"

    def build(self, module, trainable) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        t = self.train
        module.to(self.env.device)
        mp = MixedPrecisionPolicy(param_dtype=_DTYPES[t.dtype], reduce_dtype=torch.float32)
        if t.compile:
            from .single import compile_blocks

            compile_blocks(module)
        for k in module.layers + module.top:
            fully_shard(module.lm.layers[k], mp_policy=mp)
        fully_shard(module, mp_policy=mp)
        # fully_shard swaps parameters for DTensors: look the trainable ones up again by name
        names = set(trainable)
        self.params = {n: p for n, p in module.lm.named_parameters() if n in names}
        groups = param_groups(self.params, t.weight_decay, module.lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
        self.module = module
        self.log_sharding()

    def local_elements(self) -> int:
        ps = {id(p): p for p in self.module.parameters()}.values()
        return sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in ps)

    def forward_backward(self, batch, denom, accum):
        dev = self.env.device
        loss = self.module(batch["x"].to(dev), batch["targets"].to(dev), batch["loss_mask"].to(dev), denom)
        (loss / accum).backward()
        return loss.detach()

    def step(self):
        clip = self.train.grad_clip if self.train.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save_state(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        self._prepare_dir()
        tag = self._tag(step)
        dcp.save(self._state(), checkpoint_id=os.path.join(self.state_path, tag))
        barrier()
        if self.env.is_main:
            tmp = os.path.join(self.state_path, "latest.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(self.state_path, "latest"))
        self._write_world()
        self._prune(tag)

    def load_state(self) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        latest = os.path.join(self.state_path, "latest")
        tag = None
        if os.path.isfile(latest):
            with open(latest, encoding="utf-8") as f:
                tag = f.read().strip() or None
        tag = broadcast_object(tag)
        if tag is None:
            return 0
        self._check_world()
        state = self._state()
        dcp.load(state, checkpoint_id=os.path.join(self.state_path, tag))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return int(tag.removeprefix("step"))

    def full_state_dict(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        return {k.removeprefix("lm."): v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def close(self) -> None:
        super().close()
        gc.collect()
