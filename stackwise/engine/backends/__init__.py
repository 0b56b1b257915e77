# SPDX-License-Identifier: MIT
"""The stage backend interface and its registry: one API for every way a stage, the end-to-end baseline or a
fine-tune is trained (single process, DeepSpeed ZeRO-3, FSDP2).

The training loop (:mod:`stackwise.engine.loop`) only ever talks to a :class:`StageBackend`:

    backend = create_backend(env.backend, train_cfg, engine_cfg, env, state_path)
    backend.build(module, trainable)          # a StageModule (plain, on the host) + its trainable parameters
    backend.set_lr(lr)                        # once per optimizer step
    loss = backend.forward_backward(batch, denom, accum)   # per micro-batch; returns the detached loss
    gnorm = backend.step()                    # clip + optimizer step; the global gradient norm
    backend.save_state(step) / backend.load_state() -> step   # resumable state (0 when there is none)
    state = backend.full_state_dict()         # the whole, unsharded module on CPU (every rank)
    model = backend.eval_model()              # a plain StackWiseLM holding the trained weights; frees the engine
    backend.close()

A new backend is one module with a ``StageBackend`` subclass plus one :func:`register` call (or an entry in
``_REGISTRY``); nothing else in the engine names a backend.
"""

from __future__ import annotations

import importlib
import json
import os

import torch
from torch import nn

from ...model import StackWiseLM
from ..distributed import DistEnv, broadcast_object
from ..stage_module import StageModule

__all__ = ["StageBackend", "StageModule", "available", "create_backend", "param_groups", "register"]

_REGISTRY: dict[str, str | type] = {
    "single": "stackwise.engine.backends.single:SingleBackend",
    "deepspeed": "stackwise.engine.backends.deepspeed:DeepSpeedBackend",
    "fsdp": "stackwise.engine.backends.fsdp:FSDPBackend",
}


def register(name: str, target: str | type) -> None:
    """Make ``engine.backend=<name>`` build ``target`` (a StageBackend subclass or ``"module:Class"``)."""
    _REGISTRY[name] = target


def available() -> list[str]:
    return sorted(_REGISTRY)


def create_backend(name: str, train, engine, env: DistEnv, state_path: str) -> "StageBackend":
    """The backend registered as ``name``, not yet built.

    Raises:
        ValueError: no backend is registered under ``name``.
    """
    if name not in _REGISTRY:
        raise ValueError(f"engine.backend must be one of {available()}, got {name!r}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        mod, cls = target.split(":")
        target = getattr(importlib.import_module(mod), cls)
    return target(train, engine, env, state_path)


def param_groups(params: dict[str, nn.Parameter], weight_decay: float,
                 lr_scale: dict[str, float] | None = None) -> list[dict]:
    """AdamW groups: weight decay on matrices only (ZeRO-3-aware through ``ds_shape``).

    ``lr_scale`` maps parameter names to a multiplier of the scheduled learning rate (1 when absent): a stage that
    also updates an earlier layer at a lower rate passes e.g. ``{"layers.2.attn.q_proj.weight": 0.1, ...}``.
    """

    def ndim(p):
        return len(getattr(p, "ds_shape", p.shape))

    scale = lr_scale or {}
    groups = []
    for s in sorted({scale.get(n, 1.0) for n in params}, reverse=True):
        mine = [(n, p) for n, p in params.items() if scale.get(n, 1.0) == s]
        for decay in (True, False):
            ps = [p for _, p in mine if (ndim(p) >= 2) == decay]
            if ps or s == 1.0:
                groups.append({"params": ps, "weight_decay": weight_decay if decay else 0.0, "lr_scale": s})
    return groups


class StageBackend:
    """What the loop needs from a backend. Subclasses implement the methods that raise NotImplementedError.

    Args:
        train: ``cfg.train`` (optimizer, precision, clipping, accumulation).
        engine: ``cfg.engine`` (sharding, offload, activation checkpointing).
        env: this process's place in the job (rank, world, device).
        state_path: where resumable state lives (a file or a directory, the backend's choice).
    """

    name = "?"
    # whether step() returns a norm the loop can check for NaN (DeepSpeed may report none)
    finite_grad_norm = True

    def __init__(self, train, engine, env: DistEnv, state_path: str):
        self.train, self.engine, self.env, self.state_path = train, engine, env, state_path
        self.module: StageModule | None = None
        self.params: dict[str, nn.Parameter] = {}
        self.optimizer: torch.optim.Optimizer | None = None

    def build(self, module: StageModule, trainable: dict[str, nn.Parameter]) -> None:
        """Take ``module`` (plain, on the host, ``requires_grad`` already set) and make it trainable here; the
        optimizer covers ``trainable`` only, grouped by :func:`param_groups` with ``module.lr_scale``."""
        raise NotImplementedError

    def forward_backward(self, batch: dict[str, torch.Tensor], denom: torch.Tensor, accum: int) -> torch.Tensor:
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        raise NotImplementedError

    def save_state(self, step: int) -> None:
        raise NotImplementedError

    def load_state(self) -> int:
        raise NotImplementedError

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def close(self) -> None:
        self.module = self.optimizer = None
        self.params = {}

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def counts(self) -> tuple[int, int]:
        """(trainable, total) parameter elements of the whole (unsharded) module."""
        ps = {id(p): p for p in self.module.parameters()}.values()
        return (sum(getattr(p, "ds_numel", p.numel()) for p in self.params.values()),
                sum(getattr(p, "ds_numel", p.numel()) for p in ps))

    def eval_model(self) -> StackWiseLM:
        """A plain model on ``env.device`` with the trained weights, for evaluation and caching; frees the engine."""
        cfg, layers = self.module.model_cfg, self.module.layers
        state = self.full_state_dict()
        self.close()
        from .. import checkpoint as ckpt

        model = StackWiseLM(cfg, layers=layers)
        ckpt.load_into(model, state, "the gathered stage state", strict=False)
        return model.to(self.env.device)

    # sharded state records the world it was written by: another world size cannot read it back
    def _write_world(self) -> None:
        if self.env.is_main:
            os.makedirs(self.state_path, exist_ok=True)
            tmp = os.path.join(self.state_path, "world.json.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"world_size": self.env.world_size, "backend": self.name}, f)
            os.replace(tmp, os.path.join(self.state_path, "world.json"))

    def _check_world(self) -> None:
        path = os.path.join(self.state_path, "world.json")
        saved = None
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                saved = json.load(f).get("world_size")
        saved = broadcast_object(saved)
        if saved is not None and saved != self.env.world_size:
            raise RuntimeError(
                f"the resumable state {self.state_path} was written by {saved} ranks, but this job has "
                f"{self.env.world_size}; resume with {saved} ranks (e.g. --nproc_per_node {saved}), or delete "
                f"{self.state_path} to restart this stage from its beginning"
            )
