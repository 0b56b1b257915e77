# SPDX-License-Identifier: MIT
"""GPU-suite setup: every test here is ``@pytest.mark.gpu`` and skips, with a reason, unless it can run natively.

``pytest.ini`` deselects the marker (``-m "not gpu"``), so ``make test`` never runs these; ``pytest -m gpu
tests/gpu`` (what ``benchmarks/gpu_check.sh`` runs, with ``TRITON_INTERPRET=0``) does. The Triton kernels must
run compiled, not in the interpreter: tests/kernels/conftest.py sets ``TRITON_INTERPRET=1`` when it is collected
in the same session, so a run that includes tests/kernels skips here instead of timing the interpreter.

Without CUDA every test here skips, but pytest still imports these modules while collecting, before
tests/kernels/conftest.py: Triton fixes a kernel's mode when its module is imported, so on such a machine this
file sets ``TRITON_INTERPRET=1`` first, as tests/kernels/conftest.py would (a CUDA machine is left alone).
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402




def gpu_skip_reason() -> str | None:
    """Why the GPU suite cannot run here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set (tests/kernels/conftest.py); run TRITON_INTERPRET=0 pytest -m gpu tests/gpu"
    return None


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    reason = gpu_skip_reason()
    for item in items:
        if Path(str(item.fspath)).resolve().parent == here:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)
    yield
