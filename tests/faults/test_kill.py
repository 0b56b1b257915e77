# SPDX-License-Identifier: MIT
"""SIGKILL a whole run (train_layerwise.py) at chosen points, resume, and get the uninterrupted run bit for bit.

Each trial launches ``tests/faults/killer.py POINT N launchers/train_layerwise.py`` (see killer.py for the
points), checks the process died by SIGKILL, reruns the run in-process with ``train.resume=true`` and compares
every layer file, the fused model and the activation/view caches with an uninterrupted reference run. The
many-point loop is benchmarks/fault_soak.py; these are the handful CI runs.
"""

import hashlib
import os
import subprocess
import sys

import pytest
import torch

from stackwise.config import config_from_dict, save_config
from stackwise.data.activations import read_manifest
from stackwise.engine import checkpoint as ckpt
from stackwise.engine.fuse import fuse
from stackwise.engine.rundir import RunDir
from stackwise.engine.stages import train_all

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILLER = os.path.join(ROOT, "tests", "faults", "killer.py")
BASE = {
    "model": {"vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 2, "n_kv_heads": 1, "d_ff": 64,
              "max_seq_len": 64, "attention": {"attention_type": "gqa", "backend": "torch"}},
    "data": {"dummy": True, "dummy_sequences": 32, "seq_len": 16},
    "objective": {"mask_draws": 1},
    "train": {"lr": 1e-2, "batch_size": 8, "max_steps": 8, "warmup_steps": 2, "log_interval": 4,
              "eval_sequences": 8, "checkpoint_interval": 3, "resume": True, "stage_overlap": False},
    # plain stages caching every row: each layer's cache exists for the kill points and the snapshot
    "engine": {"cache_shard_sequences": 16, "cache_rows": "all"},
}
# launched runs must not inherit the kernel tests' TRITON_INTERPRET=1
ENV = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "PYTHONPATH": ROOT}


def make(out):
    return config_from_dict(BASE, [f"train.out_dir={out}"])


def run_all(cfg):
    train_all(cfg)
    fuse(cfg)


def snapshot(cfg) -> dict:
    """Every tensor of the layer files and the fused model, plus the SHA-256 of every cached shard."""
    run = RunDir(cfg)
    out = {}
    for k in range(cfg.model.n_layers):
        for n, t in ckpt.load_tensors(run.layer_ckpt(k))[0].items():
            out[f"layer_{k}/{n}"] = t
    for n, t in ckpt.load_tensors(run.fused)[0].items():
        out[f"fused/{n}"] = t
    dirs = [run.views("train"), run.views("val")] + [run.acts(k, s) for k in range(cfg.model.n_layers)
                                                     for s in run.cache_splits()]
    for d in dirs:
        m = read_manifest(d)
        # the bytes themselves: the manifest's hash name may differ (sha256 where blake3 is not installed)
        out[os.path.relpath(d, run.root)] = [hashlib.sha256(open(os.path.join(d, f["file"]), "rb").read()).hexdigest()
                                             for s in m["shards"] for f in s["files"].values()]
    return out


def assert_same(got: dict, ref: dict, what: str) -> None:
    assert got.keys() == ref.keys(), f"{what}: entries {sorted(got.keys() ^ ref.keys())} differ"
    for k in ref:
        same = torch.equal(got[k], ref[k]) if isinstance(ref[k], torch.Tensor) else got[k] == ref[k]
        assert same, f"{what}: {k} differs from the uninterrupted run"


def leftovers(root: str) -> list[str]:
    """Temp files / staging directories still on disk (none may survive a completed resume)."""
    bad = []
    for dirpath, dirnames, files in os.walk(root):
        for name in files + dirnames:
            if ".tmp" in name or name.endswith((".partial", ".old")):
                bad.append(os.path.relpath(os.path.join(dirpath, name), root))
    return bad


def kill_and_resume(out, point: str, n: int):
    """Kill a run at (point, n), resume it in-process; returns (config, the killed process)."""
    cfg = make(out)
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "..", os.path.basename(out) + ".yaml")
    save_config(cfg, cfg_path)
    p = subprocess.run([sys.executable, KILLER, point, str(n), "launchers/train_layerwise.py", "--config", cfg_path],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    run_all(cfg)
    return cfg, p


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg = make(str(tmp_path_factory.mktemp("ref") / "run"))
    run_all(cfg)
    return snapshot(cfg)


# save_file calls of this config: stage 0 states at steps 3, 6 (1, 2), layer_0 (3), stage 1 states (4, 5),
# layer_1 (6), fused (7); shard sets closed: views train (1), views val (2), layer_0 train (3) / val (4), ...
@pytest.mark.parametrize("point,n", [
    pytest.param("step", 13, id="mid-step-stage1"),
    pytest.param("ckpt_tmp", 3, id="layer0-tmp-not-renamed"),
    pytest.param("shard_tmp", 4, id="shard-half-written"),
    pytest.param("shard_swap", 3, id="cache-swap"),
    pytest.param("ckpt_tmp", 7, id="fusion"),
])
def test_kill_then_resume_equals_uninterrupted(tmp_path, reference, point, n):
    out = str(tmp_path / "run")
    cfg, p = kill_and_resume(out, point, n)
    assert p.returncode == -9, f"the run was not killed at {point}#{n} (rc {p.returncode}):\n{p.stderr[-2000:]}"
    assert_same(snapshot(cfg), reference, f"killed at {point}#{n}, resumed")
    assert leftovers(out) == [], f"killed at {point}#{n}: left behind {leftovers(out)}"
