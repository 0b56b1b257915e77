# SPDX-License-Identifier: MIT
"""Launcher command line: boolean shortcuts (--dummy, --resume) alone or with a true/false value."""

import os

import pytest

from stackwise.engine.cli import parse, parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
TEXT = "--data.corpus=shakespeare"  # data.dummy=false needs a text source to pass validation


def _cfg(*argv):
    return parse(parser("test"), ["--config", TINY, *argv])[1]


@pytest.mark.parametrize(
    "argv, dummy, resume",
    [
        (["--dummy"], True, False),
        (["--dummy", "True"], True, False),
        (["--dummy", "true", "--max_steps", "50"], True, False),
        (["--dummy=1"], True, False),
        (["--dummy", "false", TEXT], False, False),
        (["--dummy=False", TEXT], False, False),
        (["--dummy", "0", TEXT], False, False),
        (["--resume"], True, True),
        (["--resume", "--dummy"], True, True),
        (["--resume=1"], True, True),
        (["--resume", "yes", "--max_steps", "7"], True, True),
        (["--resume", "false"], True, False),
        (["--resume", "OFF", "--train.lr=3e-4"], True, False),
        (["--resume", "--train.lr=3e-4"], True, True),
    ],
)
def test_boolean_shortcuts(argv, dummy, resume):
    cfg = _cfg(*argv)
    assert (cfg.data.dummy, cfg.train.resume) == (dummy, resume)


def test_value_overrides_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  dummy: false\n  corpus: shakespeare\ntrain:\n  resume: true\n")
    _, cfg = parse(parser("test"), ["--config", str(p)])
    assert (cfg.data.dummy, cfg.train.resume) == (False, True)
    _, cfg = parse(parser("test"), ["--config", str(p), "--dummy", "true", "--resume", "false"])
    assert (cfg.data.dummy, cfg.train.resume) == (True, False)


def test_train_layerwise_example_parses():
    cfg = _cfg("--dummy", "True", "--max_steps", "50")
    assert cfg.data.dummy is True and cfg.train.max_steps == 50


@pytest.mark.parametrize("argv, flag", [(["--dummy", "maybe"], "--dummy"), (["--resume=2"], "--resume")])
def test_bad_value_is_one_clear_error(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        _cfg(*argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert f"argument {flag}" in last and "expected true or false" in last and repr(argv[-1].split("=")[-1]) in last
    assert "Traceback" not in err


def test_stray_word_still_rejected(capsys):
    with pytest.raises(SystemExit):
        _cfg("--max_steps", "5", "True")
    assert "unrecognized argument 'True'" in capsys.readouterr().err
