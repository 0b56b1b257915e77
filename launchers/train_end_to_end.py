# SPDX-License-Identifier: MIT
"""Train the whole model end to end (the baseline): ``python launchers/train_end_to_end.py --config FILE``.

Any backend: ``torchrun --nproc_per_node 2 launchers/train_end_to_end.py --engine.backend=fsdp`` or the deepspeed
launcher with ``--engine.backend=deepspeed``. Writes ``<out_dir>/end_to_end.safetensors``; ``--resume`` continues
an interrupted run.
"""

import json

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.end_to_end import train_end_to_end
from stackwise.engine.distributed import exit_process


@main_guard
def main() -> None:
    _, cfg = parse(parser(__doc__.splitlines()[0]))
    result = train_end_to_end(cfg)
    result.pop("history")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
    exit_process()  # after a process group: leave without finalization (see its docstring)
