# SPDX-License-Identifier: MIT
"""Process-group setup for the layer-wise engine: which rank am I, which backend runs, and small collectives.

``torchrun`` and the ``deepspeed`` launcher both set ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` (+ ``MASTER_ADDR``/
``MASTER_PORT``). When ``RANK`` is unset the process is a world of one and nothing is initialised, so
``python launchers/train_layer.py`` runs the same code without a launcher (nanoGPT's ``ddp = RANK != -1``).

Backend choice (:func:`resolve_backend`): ``engine.backend`` wins when it is deepspeed or fsdp. With
``engine.backend=single`` and WORLD_SIZE > 1 the launcher decides: the ``deepspeed`` launcher picks deepspeed,
``torchrun`` picks fsdp, and a warning names the setting; a world of one always runs single.

The process group uses NCCL on CUDA and gloo on CPU, with ``engine.dist_timeout_s`` as the collective
timeout, so a rank that dies makes its peers fail after that long instead of hanging (the launchers
then stop the job and name the failed rank). DeepSpeed is initialised once, through
``deepspeed.init_distributed``; on CPU its shared-memory all-reduce op is switched off because it
JIT-compiles for 60-90 s and gloo is fast enough for CPU runs (``STACKWISE_DS_SHM=1`` keeps it).
"""

from __future__ import annotations

import datetime
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import ConfigError, StackWiseConfig
from .log import init_logging, logger


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = "single"
    """The resolved engine backend: single, deepspeed or fsdp."""
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.backend != "single"


def env_world() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from the launcher's env; (0, 0, 1) without a launcher."""
    if "RANK" not in os.environ:
        return 0, 0, 1
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise RuntimeError(f"RANK/LOCAL_RANK/WORLD_SIZE must be integers ({e}); launch with torchrun or deepspeed") from None
    if not 0 <= rank < world:
        raise RuntimeError(f"RANK ({rank}) must be in [0, WORLD_SIZE={world}); the launcher environment is broken")
    return rank, local, world


def launcher_name() -> str:
    """``deepspeed``, ``torchrun`` or ``none``, from the variables each launcher sets."""
    if "TORCHELASTIC_RUN_ID" in os.environ or "GROUP_RANK" in os.environ:
        return "torchrun"
    if "CROSS_RANK" in os.environ or "LOCAL_SIZE" in os.environ:
        return "deepspeed"
    return "none"


def resolve_backend(cfg: StackWiseConfig, world_size: int) -> str:
    """The backend this launch runs (see the module docstring)."""
    want = cfg.engine.backend
    if want != "single":
        return want
    if world_size == 1:
        return "single"
    pick = {"deepspeed": "deepspeed", "torchrun": "fsdp"}.get(launcher_name())
    if pick is None:
        raise ConfigError(
            f"engine.backend='single' runs one process, got WORLD_SIZE={world_size}; set --engine.backend=deepspeed "
            f"or --engine.backend=fsdp"
        )
    logger.warning("engine.backend='single' with WORLD_SIZE=%d under %s: using engine.backend=%s (set it "
                   "explicitly to silence this)", world_size, launcher_name(), pick)
    return pick


def pick_device(cfg: StackWiseConfig, local_rank: int = 0) -> torch.device:
    """The device ``engine.device`` resolves to for this process (CUDA device ``local_rank`` mod count)."""
    want = cfg.engine.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device='cuda' but no CUDA device is visible; use engine.device=auto or cpu")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _disable_ds_cpu_shm() -> None:
    # the shm all-reduce op JIT-compiles for a minute on first use; gloo serves CPU runs
    if os.environ.get("STACKWISE_DS_SHM") == "1":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


_joined_world = False  # set once this process has joined a process group (init_distributed)


def init_distributed(cfg: StackWiseConfig) -> DistEnv:
    """Set up logging, the device and (for a distributed backend) the process group. Idempotent.

    Raises:
        ConfigError: the world size does not fit the batch settings, or backend single under a launcher.
        RuntimeError: a broken launcher environment or a missing CUDA device.
    """
    rank, local, world = env_world()
    init_logging(rank)
    backend = resolve_backend(cfg, world)
    cfg.check_world(world)
    device = pick_device(cfg, local)
    if backend == "single":
        return DistEnv(rank, local, world, backend, device)
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise RuntimeError(f"WORLD_SIZE={world} but MASTER_ADDR is unset; launch with torchrun or deepspeed")
    if world == 1:
        # a world of one without a launcher: a local rendezvous so the same code path runs
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
    comm = "nccl" if device.type == "cuda" else "gloo"
    # DeepSpeed 0.19 calls the renamed torch 2.13 collectives once per step; the warning says nothing to users
    warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed\.", category=FutureWarning)
    timeout = datetime.timedelta(seconds=cfg.engine.dist_timeout_s)
    import torch.distributed as dist

    global _joined_world
    _joined_world = True
    if not dist.is_initialized():
        if backend == "deepspeed":
            import deepspeed

            if device.type == "cpu":
                _disable_ds_cpu_shm()
            deepspeed.init_distributed(dist_backend=comm, timeout=timeout)
        else:
            dist.init_process_group(comm, timeout=timeout, device_id=device if comm == "nccl" else None)
    logger.info("distributed: backend %s over %s | world %d | rank %d (local %d) | %s", backend, comm, world, rank,
                local, device)
    return DistEnv(rank, local, world, backend, device)


def exit_process() -> None:
    """End a launcher process that joined a process group, after its work succeeded: flush the output and leave
    with status 0 without the interpreter's finalization.

    Gloo's C++ threads and process groups that library objects (a DeepSpeed engine, an FSDP mesh) still hold
    can be torn down in any order at interpreter exit, and under load a rank then aborted after its stage was
    done and saved ("terminate called without an active exception", exit -6; sessions 5-9, not reproducible on
    demand). Everything a stage writes is complete and atomic before this point, so nothing is lost by skipping
    finalization. A process that never joined a group returns and exits normally. Launchers only: the library
    never calls it.
    """
    if not _joined_world:
        return
    import logging
    import sys

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(0)


def shutdown() -> None:
    """Destroy the process group if one exists (call in a ``finally``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(cfg: StackWiseConfig):
    """``with distributed(cfg) as env:`` initialises the world and always tears it down."""
    env = None
    ok = False
    try:
        env = init_distributed(cfg)
        yield env
        ok = True
    finally:
        if env is not None and env.backend != "single":
            if ok:  # every rank finished: meet before tearing the group down, so no rank closes its connections
                barrier()  # while a peer is still using them (the abort at exit is exit_process's, not this)
            shutdown()


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def barrier() -> None:
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (in place on a copy); ``t`` itself in a world of one."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return t
    t = t.clone()
    d.all_reduce(t)
    return t


def all_gather_object(obj) -> list:
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return [obj]
    out = [None] * d.get_world_size()
    d.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return obj
    box = [obj]
    d.broadcast_object_list(box, src=src)
    return box[0]
