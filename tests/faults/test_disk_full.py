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


def _unmount(mnt) -> None:
    # lazy: a file the test's code still holds open (e.g. a prefetch thread's) must not leave the mount behind
    rc = subprocess.run(["umount", "-l", str(mnt)], capture_output=True, text=True)
    assert rc.returncode == 0, f"could not unmount {mnt}: {rc.stderr}"


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
        _unmount(mnt)


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


@pytest.fixture
def tiny_fs(tmp_path):
    """A real 2 MiB tmpfs (root only): the cache and checkpoint tests need the whole write path, Rust included."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root (the ENOSPC-injection test above covers checkpoints without it)")
    yield mnt
    _unmount(mnt)


def _fill(mnt, leave: int) -> None:
    """Fill the filesystem until ``leave`` bytes are free."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    with open(mnt / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_cache_rebuild_on_a_full_disk_keeps_the_previous_cache(tiny_fs):
    import numpy as np

    from stackwise.data.activations import ActivationCacheError, ShardWriter, load_shard, read_manifest

    d = str(tiny_fs / "acts" / "layer_0" / "train")
    w = ShardWriter(d, "layer")
    for i in range(2):
        w.add({"h": np.full((4, 8), i, np.float32)})
    good = w.close({"dtype": "float32"})
    _fill(tiny_fs, 64 * 1024)
    w = ShardWriter(d, "layer")  # a rebuild that cannot fit
    with pytest.raises(ActivationCacheError, match=r"could not write .*shard_\d+\.h\.npy.*No space left.*free disk"):
        for i in range(4):
            w.add({"h": np.ones((64, 256), np.float32)})
    assert read_manifest(d) == good, "the previous complete cache must stay in place"
    # every shard still reads through the verifying reader
    assert all(load_shard(d, good, i)["h"].shape == (4, 8) for i in range(2))
    assert not os.path.exists(d + ".partial"), "the failed build's staging directory must be freed"


def test_stage_on_a_full_disk_says_so_and_keeps_the_checkpoint(tiny_fs, capsys):
    from stackwise.config import config_from_dict
    from stackwise.data.activations import read_manifest
    from stackwise.engine import cli
    from stackwise.engine.rundir import RunDir
    from stackwise.engine.stages import train_stage

    base = {"model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
                      "max_seq_len": 64, "attention": {"backend": "torch"}},
            "data": {"dummy": True, "dummy_sequences": 32, "seq_len": 16}, "objective": {"mask_draws": 1},
            "train": {"batch_size": 8, "max_steps": 4, "log_interval": 2, "checkpoint_interval": 2,
                      "eval_sequences": 8, "out_dir": str(tiny_fs / "run"),
                      "stage_overlap": False},  # plain stages: stage 0 caches layer 0 for stage 1
            "engine": {"cache_shard_sequences": 16}}
    cfg = config_from_dict(base)
    train_stage(cfg, 0)
    run = RunDir(cfg)
    before = ckpt.load_tensors(run.layer_ckpt(0))[0]
    manifest = read_manifest(run.acts(0, "train"))
    _fill(tiny_fs, 8 * 1024)
    with pytest.raises(SystemExit) as e:
        cli.main_guard(lambda: train_stage(cfg, 1))()
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and "No space left" in err and "free disk space" in err, err
    # the previous stage's checkpoint and cache are intact and still verify
    after = ckpt.load_tensors(run.layer_ckpt(0))[0]
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert read_manifest(run.acts(0, "train")) == manifest
    os.remove(tiny_fs / "filler")
    train_stage(config_from_dict(base, ["train.resume=true"]), 1)  # space freed: the stage completes
    assert run.has_acts(1)
