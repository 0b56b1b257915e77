# SPDX-License-Identifier: MIT
"""Train every stage in order, then fuse: ``python launchers/train_layerwise.py --config FILE [--key=value ...]``.

Finished stages are skipped, an interrupted one restarts (or continues with --resume), so rerunning after a
crash picks up where the run stopped.
"""

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.fuse import fuse
from stackwise.engine.report import plot_run, stage_table
from stackwise.engine.trainer import train_all


@main_guard
def main() -> None:
    _, cfg = parse(parser(__doc__.splitlines()[0]))
    train_all(cfg)
    fuse(cfg)
    print(stage_table(cfg.train.out_dir))
    plot_run(cfg.train.out_dir)


if __name__ == "__main__":
    main()
