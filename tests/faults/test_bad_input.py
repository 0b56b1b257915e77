# SPDX-License-Identifier: MIT
"""Fuzzed configs and launcher arguments: every failure is a ConfigError (or argparse's exit 2) naming a field."""

import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stackwise.config import ConfigError, StackWiseConfig, config_from_dict, iter_fields
from stackwise.engine import cli

FIELDS = [name for name, *_ in iter_fields()]
SECTIONS = sorted({f.split(".")[0] for f in FIELDS})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.lists(st.integers(-3, 3), max_size=3))
keys = st.one_of(st.sampled_from(FIELDS), st.text(string.ascii_lowercase + "._", min_size=1, max_size=20))


def _nest(items):
    tree = {}
    for key, value in items:
        node = tree
        parts = [p for p in key.split(".") if p] or ["x"]
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return tree


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(keys, scalars), min_size=1, max_size=4))
def test_fuzzed_config_trees(items):
    tree = _nest(items)
    try:
        cfg = config_from_dict(tree)
    except ConfigError as e:
        msg = str(e)
        # the message names a config field or section, or says what is wrong with the whole tree
        assert any(s in msg for s in SECTIONS) or "config" in msg, msg
        return
    assert isinstance(cfg, StackWiseConfig)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(FIELDS), st.text(string.printable.strip(), max_size=10)), min_size=1,
                max_size=3))
def test_fuzzed_cli_overrides(items):
    overrides = [f"--{k}={v}" for k, v in items]
    try:
        config_from_dict({}, overrides)
    except ConfigError as e:
        assert any(k in str(e) for k, _ in items) or "override" in str(e), str(e)


@settings(max_examples=200, deadline=None)
@given(st.text(string.printable, max_size=200))
def test_fuzzed_yaml_files(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    from stackwise.config import load_config

    try:
        load_config(path)
    except ConfigError as e:
        assert str(path) in str(e) or "config" in str(e)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(["--layer", "--config", "--mode", "--max_steps", "--dummy", "--resume", "x", "-1",
                                 "3", "--train.lr=1", "--model.d_model=0", "--bogus", "clm", "--train.lr",
                                 "--local_rank=0", "--attention_mode", "causal"]), max_size=6))
def test_fuzzed_launcher_arguments(argv):
    p = cli.parser("fuzz", layer=True)
    try:
        cli.parse(p, argv)
    except SystemExit as e:
        assert e.code == 2  # argparse usage error: one line, no traceback
    except (ConfigError, FileNotFoundError) as e:
        assert str(e)


def test_every_field_rejects_a_wrong_type():
    """One deliberate wrong-type value per leaf field: the error names that field."""
    for name, tp, default, _ in iter_fields():
        bad = {"int": "seven", "float": "fast", "str": 7, "bool": "maybe", "list[str]": 5}[tp]
        with pytest.raises(ConfigError) as e:
            config_from_dict({}, [f"--{name}={yaml.safe_dump(bad).strip()}" if not isinstance(bad, str)
                                  else f"--{name}={bad}"])
        assert name in str(e.value), (name, str(e.value))
