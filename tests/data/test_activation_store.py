# SPDX-License-Identifier: MIT
"""The activation store's verified reads: BLAKE3 recorded per file, SHA-256 manifests of older runs still verify,
every flipped byte is refused, and the array is parsed in place from the hashed bytes (no second copy)."""

import hashlib
import json
import os

import numpy as np
import pytest

from stackwise.data import activations
from stackwise.data.activations import (
    ActivationCacheError,
    ShardStream,
    ShardWriter,
    _manifest_digest,
    load_shard,
    read_manifest,
    read_shard_array,
)


def _write(d, n_shards=2, rows=6):
    w = ShardWriter(str(d), "layer")
    for i in range(n_shards):
        w.add({"h": np.arange(rows * 40, dtype=np.float32).reshape(rows, 5, 8) + i,
               "ids": np.full((rows, 5), i, np.int32)})
    return w.close({"dtype": "float32"})


def test_blake3_recorded_and_verified_in_place(tmp_path, monkeypatch):
    m = _write(tmp_path / "c")
    e = m["shards"][1]["files"]["h"]
    assert e["hash"] == "blake3" and len(e["digest"]) == 64 and "sha256" not in e
    import blake3

    assert e["digest"] == blake3.blake3((tmp_path / "c" / e["file"]).read_bytes()).hexdigest()
    monkeypatch.setattr(activations, "_BLOCK", 100)  # many blocks per file: hashed as they arrive
    a = read_shard_array(str(tmp_path / "c"), e)
    assert np.array_equal(a, np.arange(240, dtype=np.float32).reshape(6, 5, 8) + 1)
    # a view of the one buffer the bytes were read (and hashed) into, not a copy of it
    assert a.base is not None and a.base.dtype == np.uint8 and a.base.nbytes == os.path.getsize(
        tmp_path / "c" / e["file"])


@pytest.mark.parametrize("where", [0, 60, -1])
def test_any_flipped_byte_is_refused(tmp_path, where, monkeypatch):
    monkeypatch.setattr(activations, "_BLOCK", 64)
    m = _write(tmp_path / "c")
    e = m["shards"][0]["files"]["h"]
    path = tmp_path / "c" / e["file"]
    raw = bytearray(path.read_bytes())
    raw[where] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ActivationCacheError, match=r"shard_00000\.h\.npy failed its checksum .*delete"):
        read_shard_array(str(tmp_path / "c"), e)
    path.write_bytes(bytes(raw[:-1]))  # truncated
    with pytest.raises(ActivationCacheError, match="failed its checksum"):
        read_shard_array(str(tmp_path / "c"), e)


def test_sha256_manifest_of_an_older_run_still_verifies(tmp_path):
    d = tmp_path / "c"
    m = _write(d)
    # rewrite the manifest as the store wrote it before BLAKE3: {"sha256": ...} per file, no hash name
    for s in m["shards"]:
        for e in s["files"].values():
            del e["hash"], e["digest"]
            e["sha256"] = hashlib.sha256((d / e["file"]).read_bytes()).hexdigest()
    m["manifest_sha256"] = _manifest_digest(m)
    (d / "manifest.json").write_text(json.dumps(m))
    m = read_manifest(str(d))
    assert np.array_equal(load_shard(str(d), m, 1)["ids"], np.full((6, 5), 1, np.int32))
    (d / m["shards"][1]["files"]["ids"]["file"]).write_bytes(b"\x93NUMPY" + b"\0" * 10)
    with pytest.raises(ActivationCacheError, match=r"shard_00001\.ids\.npy failed its checksum"):
        load_shard(str(d), m, 1)


def test_unknown_hash_and_missing_blake3_are_named(tmp_path, monkeypatch):
    m = _write(tmp_path / "c")
    e = dict(m["shards"][0]["files"]["h"], hash="md5")
    with pytest.raises(ActivationCacheError, match=r"unknown shard hash 'md5'.*known: \['blake3', 'sha256'\]"):
        read_shard_array(str(tmp_path / "c"), e)
    monkeypatch.setattr(activations, "_blake3", lambda: None)
    with pytest.raises(ActivationCacheError, match=r"blake3 package is not installed; run: pip install blake3=="):
        read_shard_array(str(tmp_path / "c"), m["shards"][0]["files"]["h"])
    # writing without blake3 falls back to sha256, named in the manifest, and still verifies
    m2 = _write(tmp_path / "d")
    assert m2["shards"][0]["files"]["h"]["hash"] == "sha256"
    assert load_shard(str(tmp_path / "d"), m2, 0)["h"].shape == (6, 5, 8)


def test_stream_reexported_and_prefetch_verifies(tmp_path):
    import subprocess
    import sys

    from stackwise.data.stream import ShardStream as S

    assert S is ShardStream
    # either module may be imported first
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    subprocess.run([sys.executable, "-c", "import stackwise.data.stream"], check=True, env=env)
    v = ShardWriter(str(tmp_path / "views"), "views")
    for i in range(3):
        ids = np.full((4, 5), i, np.int32)
        v.add({"ids": ids, "targets": ids, "loss_mask": np.ones((4, 5), np.uint8), "rate": np.ones(4, np.float32)})
    v.close({})
    m = read_manifest(str(tmp_path / "views"))
    e = m["shards"][2]["files"]["targets"]
    p = tmp_path / "views" / e["file"]
    p.write_bytes(p.read_bytes()[:-1] + b"\x07")
    batches = ShardStream(str(tmp_path / "views"), None, 4, shuffle=False).epoch_batches(0)
    assert [int(next(batches)["x"][0, 0]) for _ in range(2)] == [0, 1]
    with pytest.raises(ActivationCacheError, match=r"shard_00002\.targets\.npy failed its checksum"):
        next(batches)
