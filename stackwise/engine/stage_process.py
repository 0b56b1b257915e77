# SPDX-License-Identifier: MIT
"""One layer-wise stage as a process: ``python -m stackwise.engine.stage_process [--config FILE] [--layer K] ...``.

Without --layer it trains the run's next untrained stage. ``launchers/train_layer.py`` is this entry point,
and :mod:`stackwise.engine.stages` starts it as a child process per stage, so the package never runs a launcher.
"""

from __future__ import annotations

from .cli import main_guard, parse, parser
from .run import next_stage
from .trainer import train_stage


@main_guard
def main(argv: list[str] | None = None) -> None:
    args, cfg = parse(parser("Train one layer-wise stage", layer=True), argv)
    layer = args.layer if args.layer is not None else next_stage(cfg)
    train_stage(cfg, layer)


if __name__ == "__main__":
    main()
