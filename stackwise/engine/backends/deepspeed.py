# SPDX-License-Identifier: MIT
"""DeepSpeed ZeRO-3 (+ offload) backend.

The unit is built whole on the host (seeded init, carried head) and partitioned by ``deepspeed.zero.Init(module=...)``
before ``deepspeed.initialize``: building inside the ``zero.Init`` context needs constructors that tolerate
partitioned (empty) children, and ``SwiGLU.reset_parameters`` reads ``weight.shape[1]``. ``requires_grad`` is fixed
by the caller before :meth:`build` (ZeRO-3 builds its groups at initialize; DeepSpeed #5639) and only the trainable
parameters reach the optimizer (frozen seeded SwiGLU projections get no state). Resume state is
``engine.save_checkpoint(state_path, tag="stepSSSSSS", client_state)`` plus ``world.json``.
"""

from __future__ import annotations

import gc

import torch

from ..ds_config import build_ds_config, uses_ds_optimizer
from ._sharded import ShardedBackend
from . import param_groups


class DeepSpeedBackend(ShardedBackend):
    name = "deepspeed"
    finite_grad_norm = False

    def build(self, module, trainable) -> None:
        import deepspeed

        t, on_cuda = self.train, self.env.device.type == "cuda"
        if t.compile:
            raise NotImplementedError("train.compile is not supported on engine.backend=deepspeed (its engine wraps "
                                      "the module itself); set --train.compile=false or use engine.backend=fsdp")
        self.ds_config = build_ds_config(t, self.engine, self.env.world_size, on_cuda=on_cuda)
        if self.engine.zero_stage == 3:
            deepspeed.zero.Init(module=module.lm, config_dict_or_path=self.ds_config)
        groups = param_groups(trainable, t.weight_decay, module.lr_scale)
        optimizer = None
        if not uses_ds_optimizer(self.engine, on_cuda):
            optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=groups if optimizer is None else None, optimizer=optimizer,
            config=self.ds_config)
        self.module, self.params = module, trainable
        self.log_sharding()

    def local_elements(self) -> int:
        ps = {id(p): p for p in self.module.parameters()}.values()
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in ps)

    def forward_backward(self, batch, denom, accum):
        dev = self.env.device
        loss = self.ds(batch["x"].to(dev), batch["targets"].to(dev), batch["loss_mask"].to(dev), denom)
        # the engine scales by 1/gradient_accumulation_steps (= accum) and steps only on the boundary
        self.ds.backward(loss)
        self.ds.step()
        return loss.detach()

    def step(self):
        gnorm = self.ds.get_global_grad_norm()
        return torch.as_tensor(float(gnorm) if gnorm is not None else float("nan"))

    def save_state(self, step: int) -> None:
        self._prepare_dir()
        tag = self._tag(step)
        self.ds.save_checkpoint(self.state_path, tag=tag, client_state={"step": step})
        self._write_world()
        self._prune(tag)

    def load_state(self) -> int:
        self._check_world()
        path, client = self.ds.load_checkpoint(self.state_path)
        return 0 if path is None else int(client["step"])

    def full_state_dict(self):
        import deepspeed

        out = {}
        for name, p in self.module.lm.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().to("cpu", copy=True)
        return out

    def close(self) -> None:
        self.ds.destroy()
        del self.ds
        super().close()
        gc.collect()
