# SPDX-License-Identifier: MIT
"""Nothing in StackWise unpickles; hostile or damaged files fail safely with the file's name."""

import os
import pickle
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

from stackwise.data.activations import ActivationCacheError, ShardWriter, read_shard_array, set_entry_digest
from stackwise.engine import checkpoint as ckpt

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["layer_0.safetensors", "model.pt", "fused.safetensors"])
def test_crafted_pickle_is_never_executed(tmp_path, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    path.write_bytes(pickle.dumps({"w": _Exploit(str(marker))}))
    with pytest.raises(ckpt.CheckpointError, match=re.escape(str(path))):
        ckpt.load_tensors(str(path))
    assert not marker.exists(), "loading a checkpoint ran pickled code"


def test_pickled_npy_shard_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    w = ShardWriter(str(tmp_path / "acts"), "layer")
    w.add({"h": np.zeros((2, 3), np.float32)})
    w.close({})
    entry = w.shards[0]["files"]["h"]
    path = tmp_path / "acts" / entry["file"]
    obj = np.array([_Exploit(str(marker))], dtype=object)
    with open(path, "wb") as f:
        np.save(f, obj, allow_pickle=True)
    set_entry_digest(entry, path.read_bytes())  # even with a matching checksum
    entry["shape"] = [1]
    with pytest.raises(ActivationCacheError, match=r"shard_00000\.h\.npy is not a plain numeric \.npy array"):
        read_shard_array(str(tmp_path / "acts"), entry)
    assert not marker.exists()


def test_absurd_safetensors_header_fails_fast(tmp_path):
    path = tmp_path / "huge.safetensors"
    # header length claims 2**60 bytes; nothing may try to allocate that
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ckpt.CheckpointError, match="unreadable or corrupt"):
        ckpt.load_tensors(str(path))
    bogus = tmp_path / "bogus.safetensors"
    header = b'{"w":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,4000000000000]}}'
    bogus.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 16)
    with pytest.raises(ckpt.CheckpointError, match="unreadable or corrupt"):
        ckpt.load_tensors(str(bogus))


def test_foreign_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(ckpt.CheckpointError, match="not a StackWise checkpoint"):
        ckpt.load_tensors(str(path))


def test_no_unpickling_in_the_code():
    pattern = re.compile(r"pickle\.loads?\(|weights_only\s*=\s*False|allow_pickle\s*=\s*True|torch\.load\((?![^)]*weights_only=True)")
    hits = []
    for base in ("stackwise", "launchers", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    p = os.path.join(dirpath, f)
                    for i, line in enumerate(open(p, encoding="utf-8"), 1):
                        if pattern.search(line):
                            hits.append(f"{os.path.relpath(p, ROOT)}:{i}: {line.strip()}")
    assert not hits, "unsafe deserialisation:\n" + "\n".join(hits)
