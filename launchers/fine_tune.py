# SPDX-License-Identifier: MIT
"""Fine-tune the fused model: ``python launchers/fine_tune.py --config FILE --mode clm|mlm|diffusion``."""

import json

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.finetune import fine_tune
from stackwise.engine.distributed import exit_process


@main_guard
def main() -> None:
    _, cfg = parse(parser(__doc__.splitlines()[0]))
    print(json.dumps(fine_tune(cfg, cfg.objective.fine_tune_mode)))


if __name__ == "__main__":
    main()
    exit_process()  # after a process group: leave without finalization (see its docstring)
