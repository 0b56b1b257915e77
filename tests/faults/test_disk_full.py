# SPDX-License-Identifier: MIT
"""A disk that fills up: the error says so, and the previous good checkpoint stays intact.

Uses a real 1 MiB tmpfs when this process may mount one (root in CI); otherwise ENOSPC is injected into the
writes. Either way the code under test is the real save path.
"""

import errno
import os
import subprocess

import pytest
import torch

from stackwise.engine import checkpoint as ckpt


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    mnt = tmp_path / "small"
    mnt.mkdir()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode == 0
    if not ok:
        # safetensors writes from Rust: inject ENOSPC at the Python call it returns through
        real_save = ckpt.save_file

        def save_file(tensors, path, metadata=None):
            if sum(t.numel() * t.element_size() for t in tensors.values()) > 1 << 20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_save(tensors, path, metadata=metadata)

        monkeypatch.setattr(ckpt, "save_file", save_file)
    yield mnt
    if ok:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(small_disk):
    path = str(small_disk / "layer_0.safetensors")
    good = {"w": torch.arange(1000, dtype=torch.float32)}
    ckpt.save_tensors(path, good, {"step": "1"})
    too_big = {"w": torch.ones(512 * 1024, dtype=torch.float32)}  # 2 MiB > the 1 MiB disk
    with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint .*layer_0.safetensors.*free disk space"):
        ckpt.save_tensors(path, too_big, {"step": "2"})
    tensors, meta = ckpt.load_tensors(path)
    assert torch.equal(tensors["w"], good["w"]) and meta["step"] == "1"
    assert [f for f in os.listdir(small_disk) if ".tmp-" in f] == [], "a temp file was left behind"
