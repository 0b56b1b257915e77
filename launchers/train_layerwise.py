# SPDX-License-Identifier: MIT
"""Train every stage in order, then fuse: ``python launchers/train_layerwise.py --config FILE [--key=value ...]``.

Finished stages are skipped, an interrupted one restarts (or continues with --resume), so rerunning after a
crash picks up where the run stopped. Under ``torchrun`` / ``deepspeed`` (engine.backend fsdp / deepspeed)
each stage runs in a fresh child process per rank (stackwise.engine.stages), and rank 0 alone fuses,
prints the table and plots.
"""

import sys

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.distributed import env_world, exit_process, resolve_backend
from stackwise.engine.fuse import fuse
from stackwise.engine.report import plot_run, stage_table
from stackwise.engine.stage_process import run_stages_in_subprocesses
from stackwise.engine.stages import train_all


@main_guard
def main() -> None:
    _, cfg = parse(parser(__doc__.splitlines()[0]))
    rank, _, world = env_world()
    if resolve_backend(cfg, world) == "single":
        train_all(cfg)
    else:
        run_stages_in_subprocesses(cfg, sys.argv[1:])
    if rank == 0:
        fuse(cfg)
        print(stage_table(cfg.train.out_dir))
        plot_run(cfg.train.out_dir)


if __name__ == "__main__":
    main()
    exit_process()  # after a process group: leave without finalization (see its docstring)
