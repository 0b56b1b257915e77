# SPDX-License-Identifier: MIT
"""Train one layer-wise stage: ``python launchers/train_layer.py [--config FILE] [--layer K] [--key=value ...]``.

Without --layer it trains the run's next untrained stage; without --config it uses configs/small.yaml.
Also runs under ``deepspeed`` and ``torchrun`` (the backend comes from engine.backend).
"""

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.run import next_stage
from stackwise.engine.trainer import train_stage


@main_guard
def main() -> None:
    args, cfg = parse(parser(__doc__.splitlines()[0], layer=True))
    layer = args.layer if args.layer is not None else next_stage(cfg)
    train_stage(cfg, layer)


if __name__ == "__main__":
    main()
