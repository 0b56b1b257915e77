# SPDX-License-Identifier: MIT
"""The DeepSpeed config of a stage, built in one place from ``TrainConfig`` + ``EngineConfig``.

Batch identities are computed here and never patched afterwards (STYLE.md section 7):
``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size``.
A user JSON (``engine.deepspeed_config``) is merged over the built dict key by key (nested dicts
merge), and the identities are checked again on the result, so a user file cannot silently make
them disagree. The final dict is logged at DEBUG.

Offload: ``engine.offload_optimizer`` / ``engine.offload_params`` move optimizer state / ZeRO-3
partitions to CPU memory, or to ``engine.offload_nvme_path`` (ZeRO-Infinity; needs the async_io op,
i.e. libaio, on the machine). Precision: ``train.dtype=bfloat16`` turns on DeepSpeed bf16 (CPU and
GPU); ``float16`` needs a GPU and DeepSpeed's loss scaler.

Optimizer: with ``engine.optimizer=deepspeed`` the dict names DeepSpeed's AdamW (FusedAdam on GPU,
DeepSpeedCPUAdam when offloading); each is a C++/CUDA op that JIT-compiles for 30-70 s the first time
on 2 CPU cores. ``torch`` hands a ``torch.optim.AdamW`` to ``deepspeed.initialize`` instead (no build,
what CPU runs and the tests use); ``auto`` means deepspeed on CUDA and torch elsewhere.
"""

from __future__ import annotations

import copy
import json
import os

from ..config import ConfigError
from .log import logger


def uses_ds_optimizer(engine, on_cuda: bool) -> bool:
    """Whether the DeepSpeed dict names the optimizer (else a torch AdamW is passed to initialize)."""
    choice = engine.optimizer
    if choice == "auto":
        return on_cuda
    return choice == "deepspeed"


def _offload(device_on: bool, nvme: str, what: str) -> dict | None:
    if not device_on:
        return None
    if nvme:
        return {"device": "nvme", "nvme_path": os.path.join(nvme, what), "pin_memory": True}
    return {"device": "cpu", "pin_memory": True}


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_user_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"engine.deepspeed_config {path} does not exist; give a DeepSpeed JSON file or ''")
    try:
        with open(path, encoding="utf-8") as f:
            user = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine.deepspeed_config {path} is not valid JSON ({e})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"engine.deepspeed_config {path} must hold a JSON object, got {type(user).__name__}")
    return user


def build_ds_config(train, engine, world_size: int, *, on_cuda: bool = False) -> dict:
    """The DeepSpeed config dict of a stage.

    Args:
        train: ``cfg.train``.
        engine: ``cfg.engine``.
        world_size: number of processes in the job.
        on_cuda: whether the ranks run on CUDA (decides the optimizer under ``engine.optimizer=auto``).

    Returns:
        dict ready for ``deepspeed.initialize(config=...)`` and ``deepspeed.zero.Init(config_dict_or_path=...)``.

    Raises:
        ConfigError: float16 on CPU, or a user JSON that breaks the batch identity.
    """
    t, e = train, engine
    if t.dtype == "float16" and not on_cuda:
        raise ConfigError("train.dtype='float16' needs a GPU under DeepSpeed; on CPU use float32 or bfloat16")
    micro, accum = t.batch_size, t.grad_accum
    ds: dict = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": t.grad_clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": e.zero_stage,
            "overlap_comm": on_cuda,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
            "stage3_param_persistence_threshold": 0,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_gather_16bit_weights_on_model_save": False,
        },
        "bf16": {"enabled": t.dtype == "bfloat16"},
        "fp16": {"enabled": t.dtype == "float16"},
    }
    zero = ds["zero_optimization"]
    opt_off = _offload(e.offload_optimizer, e.offload_nvme_path, "optimizer")
    par_off = _offload(e.offload_params, e.offload_nvme_path, "params")
    if opt_off:
        zero["offload_optimizer"] = opt_off
    if par_off:
        if e.zero_stage != 3:
            raise ConfigError(f"engine.offload_params needs engine.zero_stage=3, got {e.zero_stage}; set zero_stage=3")
        zero["offload_param"] = par_off
    if uses_ds_optimizer(e, on_cuda):
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": 1e-8,
                                                       "weight_decay": t.weight_decay}}
    if e.activation_checkpointing:
        ds["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False}
    if e.deepspeed_config:
        ds = _merge(ds, load_user_config(e.deepspeed_config))
        ident = ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * world_size
        if ds["train_batch_size"] != ident:
            raise ConfigError(
                f"train_batch_size ({ds['train_batch_size']}) must equal train_micro_batch_size_per_gpu "
                f"({ds['train_micro_batch_size_per_gpu']}) * gradient_accumulation_steps "
                f"({ds['gradient_accumulation_steps']}) * world size ({world_size}) = {ident} after merging "
                f"{e.deepspeed_config}; set the batch through train.batch_size / train.grad_accum instead"
            )
        if ds["train_micro_batch_size_per_gpu"] != micro or ds["gradient_accumulation_steps"] != accum:
            raise ConfigError(
                f"{e.deepspeed_config} changes the batch (micro {ds['train_micro_batch_size_per_gpu']}, accum "
                f"{ds['gradient_accumulation_steps']}) that the data stream uses (train.batch_size={micro}, "
                f"train.grad_accum={accum}); set train.batch_size / train.grad_accum instead"
            )
    logger.debug("deepspeed config: %s", json.dumps(ds, sort_keys=True))
    return ds
