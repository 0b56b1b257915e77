# SPDX-License-Identifier: MIT
"""One layer-wise stage per process: the child entry point and the parent that starts one child per stage.

``python -m stackwise.engine.stage_process [--config FILE] [--layer K] ...`` trains one stage (without --layer, the
run's next untrained stage); the train_layer launcher calls :func:`main` and nothing else.

DeepSpeed does not give all memory back when an engine is destroyed (measured here: ~23 MiB of RSS per stage
even after ``destroy``, ``gc`` and ``malloc_trim``), and ZeRO-3 fixes its parameter groups at initialize. So
under a distributed backend every rank's launcher process trains no stage itself: :func:`run_stages_in_subprocesses`
runs this module as a child process per stage with the rank's own environment and waits for it. The children of
all ranks form a fresh process group per stage (rendezvous port ``MASTER_PORT + 1 + i`` for the i-th stage, with
the launcher's agent store switched off), so a stage starts only when every rank's previous child has finished.
A child that fails makes its parent exit non-zero, which makes torchrun / the deepspeed launcher stop the job
and name the rank. The package never runs a launcher script.
"""

from __future__ import annotations

import os
import subprocess
import sys

from ..config import StackWiseConfig
from .cli import main_guard, parse, parser
from .distributed import env_world, exit_process
from .log import init_logging, logger
from .rundir import RunDir
from .stages import next_stage, train_stage

STAGE_MODULE = "stackwise.engine.stage_process"


def stage_argv(argv: list[str]) -> list[str]:
    """The launcher's arguments minus the ones each child gets anew (--layer, --local_rank)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--layer", "--local_rank", "--local-rank"):
            skip = True
            continue
        if a.startswith(("--layer=", "--local_rank=", "--local-rank=")):
            continue
        out.append(a)
    return out


def run_stages_in_subprocesses(cfg: StackWiseConfig, argv: list[str]) -> None:
    """Train every stage of ``cfg`` in order, each in a fresh child process of this rank.

    Raises:
        RuntimeError: a stage's child exited non-zero (names the stage, the rank and the exit code).
    """
    rank, local, world = env_world()
    init_logging(rank)
    base_port = int(os.environ.get("MASTER_PORT", "29500"))
    run = RunDir(cfg)
    firsts = list(range(0, cfg.model.n_layers, cfg.train.layers_per_stage))
    for i, first in enumerate(firsts):
        env = dict(os.environ)
        env["MASTER_PORT"] = str(base_port + 1 + i)
        # the children of all ranks make their own store on the new port (rank 0's child serves it)
        env["TORCHELASTIC_USE_AGENT_STORE"] = "False"
        cmd = [sys.executable, "-m", STAGE_MODULE, "--layer", str(first), f"--local_rank={local}", *stage_argv(argv)]
        if rank == 0:
            logger.info("stage %d/%d (layer %d) in a fresh process group on port %s", i + 1, len(firsts), first,
                        env["MASTER_PORT"])
        rc = subprocess.run(cmd, env=env).returncode
        if rc != 0:
            raise RuntimeError(
                f"stage {first} failed on rank {rank} of {world} (exit code {rc}); fix the cause shown above and "
                f"rerun: finished stages are skipped ({run.root})"
            )


@main_guard
def main(argv: list[str] | None = None) -> None:
    args, cfg = parse(parser("Train one layer-wise stage", layer=True), argv)
    layer = args.layer if args.layer is not None else next_stage(cfg)
    train_stage(cfg, layer)


if __name__ == "__main__":
    main()
    exit_process()  # after a process group: leave without finalization (see its docstring)
