# SPDX-License-Identifier: MIT
"""Distributed stage backends: DeepSpeed ZeRO-3 and PyTorch FSDP2 around one stage's trainable part.

Both wrap a :class:`StageModule` (the stage's ``StackWiseLM`` whose ``forward`` returns the loss) and expose
the same small API to the trainer (:class:`DistStage`): ``set_lr(lr)`` once per optimizer step, then per
micro-batch ``loss = stage(x, targets, loss_mask, weights, denom)`` and ``stage.backward(loss)``, then
``gnorm = stage.finish_step()``; ``save(step)`` / ``load() -> step`` for resume,
``full_state()`` (every rank gets the whole, unsharded stage as CPU tensors) and ``close()``.

DeepSpeed: the stage model is built under ``deepspeed.zero.Init`` (parameters are partitioned as each
module is built), then re-initialised and loaded inside ``GatheredParameters(..., modifier_rank=0)``,
because constructor code that runs after a child is partitioned sees an empty tensor (Megatron-DeepSpeed
PR #193). ``requires_grad`` is set before ``deepspeed.initialize``, which receives only the trainable
parameters (frozen seeded SwiGLU projections get no optimizer state). Resume state goes to
``runs/NAME/ds_stage_K/`` through ``engine.save_checkpoint(tag="layerKK-stepSSSSSS", client_state)``.

FSDP2: ``fully_shard`` on every block and on the root (embeddings, norm, head), torch AdamW on the
sharded (DTensor) parameters; resume state is a ``torch.distributed.checkpoint`` directory under
``runs/NAME/fsdp_stage_K/``. Both gather the full state for the layer files, so a stage trained on either
backend writes the same ``layer_K.safetensors`` as the single backend.
"""

from __future__ import annotations

import gc
import os
import shutil

import torch
from torch import nn

from ..config import StackWiseConfig, config_to_yaml
from ..model import StackWiseLM
from ..objective import masked_loss
from .distributed import DistEnv, barrier, broadcast_object
from .ds_config import build_ds_config, uses_ds_optimizer
from .log import logger
from .stage_io import run_stage_layers


class StageModule(nn.Module):
    """One stage as a module whose forward returns the (data-parallel normalised) masked loss.

    ``denom`` is the number of supervised tokens of the *global* micro-batch divided by the world size, so
    that the average of the ranks' gradients equals the gradient of the global masked mean (what a single
    process computes on the whole batch), even when ranks hold different numbers of masked tokens.
    """

    def __init__(self, lm: StackWiseLM, layers: list[int], checkpointing: bool = False,
                 attention_mode: str = "bidirectional"):
        super().__init__()
        self.lm, self.layers, self.checkpointing = lm, list(layers), checkpointing
        self.attention_mode = attention_mode

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """x: ids [B, T] (stage 0) or h [B, T, C] -> h [B, T, C] after the stage's layers."""
        h = self.lm.embed(x) if self.layers[0] == 0 else x
        return run_stage_layers(self.lm, h, self.layers, self.attention_mode, self.checkpointing)

    def forward(self, x, targets, loss_mask, weights, denom):
        return masked_loss(self.lm.head(self.hidden(x)), targets, loss_mask, weights, denom)


def param_groups(params: dict[str, nn.Parameter], cfg: StackWiseConfig) -> list[dict]:
    """AdamW groups: weight decay on matrices only (ZeRO-3-aware through ``ds_shape``)."""
    def ndim(p):
        return len(getattr(p, "ds_shape", p.shape))

    return [{"params": [p for p in params.values() if ndim(p) >= 2], "weight_decay": cfg.train.weight_decay},
            {"params": [p for p in params.values() if ndim(p) < 2], "weight_decay": 0.0}]


def _latest_tag(directory: str) -> str | None:
    path = os.path.join(directory, "latest")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read().strip() or None


class DistStage:
    """Common part of the two backends; see the module docstring for the API."""

    backend = "?"

    def __init__(self, cfg: StackWiseConfig, env: DistEnv, state_dir: str, layer: int):
        self.cfg, self.env, self.state_dir, self.layer = cfg, env, state_dir, layer

    def __call__(self, *args):
        return self.module(*args)

    def shard_report(self) -> tuple[int, int]:
        """(elements this rank holds, elements of the whole stage) over its parameters."""
        raise NotImplementedError

    def log_sharding(self) -> None:
        local, full = self.shard_report()
        logger.info("%s: rank %d holds %s of the stage's %s parameter elements (%.1f%%)", self.backend,
                    self.env.rank, f"{local:,}", f"{full:,}", 100.0 * local / max(full, 1))

    def _prune(self, keep: str) -> None:
        if not self.env.is_main:
            return
        for name in os.listdir(self.state_dir):
            p = os.path.join(self.state_dir, name)
            if os.path.isdir(p) and name != keep:
                shutil.rmtree(p, ignore_errors=True)


class DeepSpeedStage(DistStage):
    backend = "deepspeed"

    def __init__(self, cfg, env, state_dir, layer, layers, carry: dict[str, torch.Tensor], trainable_fn):
        super().__init__(cfg, env, state_dir, layer)
        import deepspeed

        on_cuda = env.device.type == "cuda"
        self.ds_config = build_ds_config(cfg, env.world_size, on_cuda=on_cuda)
        # the stage (one layer + embeddings/head) is built whole on the host with its deterministic seeded
        # init and carried head, then partitioned by zero.Init(module=...) before initialize: building inside
        # the zero.Init context needs constructors that tolerate partitioned (empty) children, and
        # SwiGLU.reset_parameters reads weight.shape[1]
        lm = StackWiseLM(cfg.model, layers=layers)
        own = dict(lm.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, t in carry.items():
                own[name].copy_(t)
        # requires_grad is fixed before initialize (ZeRO-3 builds its groups there; DeepSpeed #5639)
        params = trainable_fn(lm)
        if cfg.engine.zero_stage == 3:
            deepspeed.zero.Init(module=lm, config_dict_or_path=self.ds_config)
        module = StageModule(lm, layers, cfg.engine.activation_checkpointing, cfg.model.attention.attention_mode)
        groups = param_groups(params, cfg)
        optimizer = None
        if not uses_ds_optimizer(cfg, on_cuda):
            optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=groups if optimizer is None else None, optimizer=optimizer,
            config=self.ds_config)
        self.module = self.engine
        self.params = params

    def shard_report(self) -> tuple[int, int]:
        ps = list({id(p): p for p in self.engine.module.parameters()}.values())
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in ps)
        return local, sum(getattr(p, "ds_numel", p.numel()) for p in ps)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        # the engine scales by 1/gradient_accumulation_steps and steps (clipped) only on the boundary
        self.engine.backward(loss)
        self.engine.step()

    def finish_step(self) -> torch.Tensor:
        gnorm = self.engine.get_global_grad_norm()
        return torch.as_tensor(float(gnorm) if gnorm is not None else float("nan"))

    def save(self, step: int) -> None:
        tag = f"layer{self.layer:02d}-step{step:06d}"
        self.engine.save_checkpoint(self.state_dir, tag=tag,
                                    client_state={"step": step, "config": config_to_yaml(self.cfg)})
        barrier()
        self._prune(tag)

    def load(self) -> int:
        path, client = self.engine.load_checkpoint(self.state_dir)
        if path is None:
            return 0
        return int(client["step"])

    def full_state(self) -> dict[str, torch.Tensor]:
        import deepspeed

        out = {}
        for name, p in self.engine.module.lm.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                out[name] = p.detach().to("cpu", copy=True)
        return out

    def close(self) -> None:
        self.engine.destroy()
        del self.engine, self.module, self.optimizer, self.params
        gc.collect()


class FSDPStage(DistStage):
    backend = "fsdp"

    def __init__(self, cfg, env, state_dir, layer, layers, carry: dict[str, torch.Tensor], trainable_fn):
        super().__init__(cfg, env, state_dir, layer)
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        lm = StackWiseLM(cfg.model, layers=layers)
        own = dict(lm.named_parameters(remove_duplicate=False))
        with torch.no_grad():
            for name, t in carry.items():
                own[name].copy_(t)
        lm.to(env.device)
        params_by_name = trainable_fn(lm)
        module = StageModule(lm, layers, cfg.engine.activation_checkpointing, cfg.model.attention.attention_mode)
        dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.train.dtype]
        mp = MixedPrecisionPolicy(param_dtype=dt, reduce_dtype=torch.float32)
        for k in layers:
            fully_shard(lm.layers[k], mp_policy=mp)
        # the root owns embeddings, final norm and head; its forward is the one the trainer calls
        fully_shard(module, mp_policy=mp)
        names = set(params_by_name)
        self.params = {n: p for n, p in lm.named_parameters() if n in names}
        self.optimizer = torch.optim.AdamW(param_groups(self.params, cfg), lr=cfg.train.lr,
                                           betas=(cfg.train.beta1, cfg.train.beta2))
        self.module = module
        self.accum = cfg.train.grad_accum

    def shard_report(self) -> tuple[int, int]:
        ps = list({id(p): p for p in self.module.parameters()}.values())
        local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in ps)
        return local, sum(p.numel() for p in ps)

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum).backward()

    def finish_step(self) -> torch.Tensor:
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else float("inf")
        gnorm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, step: int) -> None:
        import torch.distributed.checkpoint as dcp

        tag = f"layer{self.layer:02d}-step{step:06d}"
        dcp.save(self._state(), checkpoint_id=os.path.join(self.state_dir, tag))
        barrier()
        if self.env.is_main:
            with open(os.path.join(self.state_dir, "latest.tmp"), "w", encoding="utf-8") as f:
                f.write(tag)
            os.replace(os.path.join(self.state_dir, "latest.tmp"), os.path.join(self.state_dir, "latest"))
        self._prune(tag)
        barrier()

    def load(self) -> int:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        tag = broadcast_object(_latest_tag(self.state_dir))
        if tag is None:
            return 0
        state = self._state()
        dcp.load(state, checkpoint_id=os.path.join(self.state_dir, tag))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return int(tag.rsplit("step", 1)[1])

    def full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True))
        return {k.removeprefix("lm."): v.detach().to("cpu", copy=True) for k, v in sd.items()}

    def close(self) -> None:
        del self.module, self.optimizer, self.params
        gc.collect()


def build_stage(cfg: StackWiseConfig, env: DistEnv, state_dir: str, layer: int, layers: list[int],
                carry: dict[str, torch.Tensor], trainable_fn) -> DistStage:
    """The distributed stage for ``env.backend`` (deepspeed or fsdp)."""
    if env.is_main:
        os.makedirs(state_dir, exist_ok=True)
    barrier()
    if env.backend == "deepspeed":
        stage = DeepSpeedStage(cfg, env, state_dir, layer, layers, carry, trainable_fn)
    elif env.backend == "fsdp":
        stage = FSDPStage(cfg, env, state_dir, layer, layers, carry, trainable_fn)
    else:
        raise ValueError(f"engine.backend must be deepspeed or fsdp for a distributed stage, got {env.backend!r}")
    stage.log_sharding()
    return stage
