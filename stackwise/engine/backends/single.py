# SPDX-License-Identifier: MIT
"""The single-process backend: CPU or one GPU, with ``train.dtype`` autocast (bf16) or a gradient scaler (fp16),
``engine.activation_checkpointing`` and ``train.compile``.

Resumable state is one safetensors file (``<name>.state.safetensors``): the trainable parameters, AdamW's moments
and step counts, and the CPU (and CUDA) RNG states, so a resumed run draws the same dropout masks.
"""

from __future__ import annotations

import json
import os

import torch

from .. import checkpoint as ckpt
from ..precision import Precision
from . import StageBackend, param_groups


def _save_state(path: str, params: dict, opt: torch.optim.Optimizer, step: int, gen_state: torch.Tensor) -> None:
    tensors = {f"param/{n}": p.detach() for n, p in params.items()}
    names = {id(p): n for n, p in params.items()}
    adam_steps = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"exp_avg/{n}"] = st["exp_avg"]
                tensors[f"exp_avg_sq/{n}"] = st["exp_avg_sq"]
                adam_steps[n] = float(st["step"])
    tensors["rng/torch"] = gen_state
    if torch.cuda.is_available():
        # dropout on a GPU draws from the CUDA generator: a resumed run must continue its sequence too
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    ckpt.save_tensors(path, tensors, {"kind": "stage_state", "step": str(step), "adam_steps": json.dumps(adam_steps)})


def _load_state(path: str, params: dict, opt: torch.optim.Optimizer) -> int:
    tensors, meta = ckpt.load_tensors(path)
    adam_steps = json.loads(meta["adam_steps"])
    names = {id(p): n for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            if f"param/{n}" not in tensors:
                raise ckpt.CheckpointError(f"{path} lacks parameter {n}; delete it and restart the stage")
            p.copy_(tensors[f"param/{n}"])
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if n in adam_steps:
                opt.state[p] = {"step": torch.tensor(adam_steps[n]), "exp_avg": tensors[f"exp_avg/{n}"].to(p.device),
                                "exp_avg_sq": tensors[f"exp_avg_sq/{n}"].to(p.device)}
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return int(meta["step"])


def compile_blocks(module) -> None:
    """``train.compile``: each transformer block of the unit becomes a ``torch.compile``d module (in place)."""
    for k in module.layers + module.top:
        module.lm.layers[k].compile()


class SingleBackend(StageBackend):
    name = "single"

    def build(self, module, trainable) -> None:
        t = self.train
        self.precision = Precision(t.dtype, self.env.device)
        # a float16 step whose gradients overflow is skipped by the scaler: an inf norm is not a failure then
        self.finite_grad_norm = self.precision.scaler is None
        self.module, self.params = module.to(self.env.device), trainable
        groups = param_groups(trainable, t.weight_decay, module.lr_scale)
        self.optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))
        if t.compile:
            compile_blocks(module)
        module.train()

    def forward_backward(self, batch, denom, accum):
        dev = self.env.device
        with self.precision.autocast():
            loss = self.module(batch["x"].to(dev), batch["targets"].to(dev), batch["loss_mask"].to(dev), denom)
        self.precision.backward(loss / accum)
        return loss.detach()

    def step(self):
        return self.precision.step(self.optimizer, list(self.params.values()), self.train.grad_clip)

    def save_state(self, step: int) -> None:
        _save_state(self.state_path, self.params, self.optimizer, step, torch.get_rng_state())

    def load_state(self) -> int:
        return _load_state(self.state_path, self.params, self.optimizer) if os.path.isfile(self.state_path) else 0

    def full_state_dict(self):
        return {n: t.detach().to("cpu", copy=True) for n, t in self.module.lm.state_dict().items()}

    def eval_model(self):
        model = self.module.lm
        self.close()
        return model
