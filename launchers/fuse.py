# SPDX-License-Identifier: MIT
"""Fuse the trained layers of a run into fused.safetensors: ``python launchers/fuse.py --config FILE``."""

from stackwise.engine.cli import main_guard, parse, parser
from stackwise.engine.fuse import fuse


@main_guard
def main() -> None:
    _, cfg = parse(parser(__doc__.splitlines()[0]))
    print(fuse(cfg))


if __name__ == "__main__":
    main()
