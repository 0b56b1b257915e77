# SPDX-License-Identifier: MIT
"""Loading the config tree: YAML files, dotted ``--section.key=value`` overrides, strict building of the dataclasses
(unknown keys suggest the nearest valid one, wrong types name the expected one), saving, and the field
docstrings that serve as CLI help and the README's field table."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import os
import types
import typing
from typing import Any

import yaml

from ._fs import atomic_write
from .config_base import ConfigError

if typing.TYPE_CHECKING:
    from .config import StackWiseConfig


def _root() -> type:
    # the tree's root class, looked up late: stackwise.config imports this module at its end
    from .config import StackWiseConfig

    return StackWiseConfig

def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(tp):
            try:
                return _coerce(name, value, arm)
            except ConfigError:
                continue
        raise ConfigError(f"{name} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, str):
            value = [value] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r} ({type(value).__name__}); e.g. [a, b]")
        return [_coerce(f"{name}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{name} must be null, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-4 (no dot) as a string; users type it that way
        try:
            return float(value)
        except ValueError:
            pass
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r} ({type(value).__name__})")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{name} must be {tp.__name__}, got boolean {value!r}")
    if tp in (int, float, str) and not isinstance(value, tp):
        raise ConfigError(f"{name} must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls: type, data: Any, prefix: str) -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys with a suggestion."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys to values, got {type(data).__name__}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
            hint = f"; did you mean {(prefix + '.' if prefix else '') + near[0]!r}?" if near else ""
            raise ConfigError(f"unknown config key {full!r}{hint} (valid keys: {', '.join(names)})")
        tp = hints[key]
        kwargs[key] = _build(tp, value, full) if _is_dataclass_type(tp) else _coerce(full, value, tp)
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    """CLI values are YAML scalars: 3, 1e-4, true, null, [gate, up], or a bare string."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _apply_override(tree: dict, item: str) -> None:
    body = item[2:] if item.startswith("--") else item
    if "=" not in body:
        raise ConfigError(f"override {item!r} must look like --section.key=value, e.g. --train.lr=3e-4")
    key, text = body.split("=", 1)
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key segment; use --section.key=value")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {p!r} is a value, not a section")
        node = child
    node[parts[-1]] = _parse_value(text)


def config_from_dict(data: dict | None, overrides: list[str] | None = None) -> StackWiseConfig:
    """Build and validate a config from a nested dict plus dotted overrides."""
    tree = _deepcopy_dict(data or {})
    for item in overrides or []:
        _apply_override(tree, item)
    return _build(_root(), tree, "")


def _deepcopy_dict(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy_dict(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy_dict(v) for v in d]
    return d


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> StackWiseConfig:
    """Read a YAML preset (or only defaults when ``path`` is None), apply overrides, validate.

    Args:
        path: YAML file; None for the dataclass defaults.
        overrides: ``["--train.lr=3e-4", "model.n_layers=4", ...]``.

    Raises:
        ConfigError: missing/empty/unparsable file, unknown key, wrong type or invalid value.
    """
    data: Any = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            presets = sorted(p for p in os.listdir(_presets_dir()) if p.endswith(".yaml")) if _presets_dir() else []
            raise ConfigError(f"config file {path!r} does not exist; presets in configs/: {', '.join(presets)}")
        with open(path, encoding="utf-8") as f:
            text = f.read()
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
        if data is None:
            raise ConfigError(f"config file {path!r} is empty, which is likely a mistake; put at least one section in it")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    try:
        return config_from_dict(data, overrides)
    except ConfigError as e:
        where = f" (in {path})" if path else ""
        raise ConfigError(f"{e}{where}") from None


def _presets_dir() -> str | None:
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    return here if os.path.isdir(here) else None


def save_config(cfg: StackWiseConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically (temp file + rename)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(config_to_yaml(cfg))

    atomic_write(path, write)


def config_to_yaml(cfg: StackWiseConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of dataclass ``cls`` (attribute docstrings, read from source)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())  # one line: CLI help, README table
    return docs


def iter_fields(cls: type | None = None, prefix: str = ""):
    """Yield ``(dotted_name, type_name, default, doc)`` for every leaf field, depth first (``cls`` None: the root)."""
    cls = cls or _root()
    docs = field_docs(cls)
    hints = _hints(cls)
    default_obj = cls()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if _is_dataclass_type(tp):
            yield from iter_fields(tp, name + ".")
        else:
            yield name, _type_name(tp), getattr(default_obj, f.name), docs.get(f.name, "")


def _main() -> None:
    """``python -m stackwise.config [FILE] [overrides]``: print the resolved config, or the field table."""
    import sys

    args = sys.argv[1:]
    if args and args[0] in ("-h", "--help", "--fields"):
        for name, tp, default, doc in iter_fields():
            print(f"| `{name}` | {tp} | `{default}` | {doc} |")
        return
    path = args[0] if args and not args[0].startswith("-") and "=" not in args[0] else None
    rest = args[1:] if path else args
    try:
        print(config_to_yaml(load_config(path, rest)), end="")
    except ConfigError as e:
        sys.exit(f"error: {e}")
