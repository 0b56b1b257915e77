# SPDX-License-Identifier: MIT
"""Kernel-test setup: Triton's CPU interpreter and NaN-poisoned allocations.

``TRITON_INTERPRET=1`` must be set before any module defining ``@triton.jit`` kernels is imported, so it is
the first statement here (pytest imports conftest files before the test modules). ``setdefault`` lets a CUDA
machine run the same tests natively with ``TRITON_INTERPRET=0``.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402



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
