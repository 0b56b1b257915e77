# SPDX-License-Identifier: MIT
"""Train one layer-wise stage: ``python launchers/train_layer.py [--config FILE] [--layer K] [--key=value ...]``.

Without --layer it trains the run's next untrained stage; without --config it uses configs/small.yaml.
Also runs under ``deepspeed`` and ``torchrun`` (the backend comes from engine.backend).
"""

from stackwise.engine.stage_process import main
from stackwise.engine.distributed import exit_process

if __name__ == "__main__":
    main()
    exit_process()  # after a process group: leave without finalization (see its docstring)
