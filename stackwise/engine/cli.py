# SPDX-License-Identifier: MIT
"""Shared command line of the launchers: --config, --layer, --local_rank, dotted overrides, SRD shortcuts.

Each shortcut is an alias of one dotted key (STYLE.md section 3):
--attention_mode -> model.attention.attention_mode, --mode -> objective.fine_tune_mode,
--checkpoint -> train.checkpoint, --dummy -> data.dummy, --max_steps -> train.max_steps,
--resume -> train.resume. The boolean shortcuts (--dummy, --resume) alone mean true and also take a value:
--dummy true, --dummy False, --resume=1, --resume no. Errors are printed as one line (no traceback) and exit
with status 2.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

from ..config import ConfigError, StackWiseConfig, load_config

DEFAULT_CONFIG = "configs/small.yaml"
ALIASES = {
    "attention_mode": "model.attention.attention_mode",
    "mode": "objective.fine_tune_mode",
    "checkpoint": "train.checkpoint",
    "max_steps": "train.max_steps",
}
FLAGS = {"dummy": "data.dummy", "resume": "train.resume"}
TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")
# FloatingPointError: a diverged stage (the message names the step and the checkpoint to resume from)
USER_ERRORS = (ConfigError, FileNotFoundError, ValueError, NotImplementedError, FloatingPointError)


def parser(description: str, *, layer: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog="Any config field can be set as --section.key=value.")
    p.add_argument("--config", default=None, help=f"YAML preset (default: {DEFAULT_CONFIG})")
    if layer:
        p.add_argument("--layer", type=int, default=None, help="first layer of the stage to train (default: the "
                       "next untrained stage of the run)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help="set by the deepspeed launcher")
    for name, key in ALIASES.items():
        p.add_argument(f"--{name}", default=None, help=f"alias of --{key}")
    for name, key in FLAGS.items():
        p.add_argument(f"--{name}", nargs="?", const=True, default=None, type=_flag_value(name), metavar="BOOL",
                       help=f"alias of --{key}; alone means true, or give true/false")
    return p


def _flag_value(name: str):
    """argparse ``type`` of a boolean shortcut: true/false words (any case) -> bool, anything else an error."""

    def convert(text: str) -> bool:
        word = text.strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise argparse.ArgumentTypeError(
            f"expected true or false (also {'/'.join(TRUE_WORDS[1:])} or {'/'.join(FALSE_WORDS[1:])}), "
            f"got {text!r}; --{name} alone means true")

    convert.__name__ = f"{name} flag"
    return convert


def parse(p: argparse.ArgumentParser, argv: list[str] | None = None) -> tuple[argparse.Namespace, StackWiseConfig]:
    """Parse known flags; the rest must be ``--section.key=value`` overrides."""
    args, rest = p.parse_known_args(argv)
    overrides = []
    for item in rest:
        if not (item.startswith("--") and "=" in item and "." in item.split("=", 1)[0]):
            p.error(f"unrecognized argument {item!r}; overrides look like --section.key=value (e.g. --train.lr=3e-4)")
        overrides.append(item)
    for name, key in ALIASES.items():
        if getattr(args, name) is not None:
            overrides.append(f"--{key}={getattr(args, name)}")
    for name, key in FLAGS.items():
        if getattr(args, name) is not None:
            overrides.append(f"--{key}={'true' if getattr(args, name) else 'false'}")
    path = args.config or _default_config()
    cfg = load_config(path, overrides)
    return args, cfg


def _default_config() -> str:
    if os.path.isfile(DEFAULT_CONFIG):
        return DEFAULT_CONFIG
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), DEFAULT_CONFIG)
    return here


def main_guard(fn):
    """Run a launcher's main: user errors become one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapped(*a, **kw):
        try:
            return fn(*a, **kw)
        except USER_ERRORS as e:
            sys.stderr.write(f"error: {e}\n")
            sys.exit(2)
        except RuntimeError as e:
            if type(e).__name__ in ("CheckpointError", "ActivationCacheError", "FusionError", "DataError"):
                sys.stderr.write(f"error: {e}\n")
                sys.exit(2)
            raise

    return wrapped
