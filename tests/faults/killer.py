# SPDX-License-Identifier: MIT
"""Run a launcher and SIGKILL it at a chosen point: ``python killer.py POINT N LAUNCHER [ARGS...]``.

Used by tests/faults/test_kill.py and benchmarks/fault_soak.py (as a script, never imported). The hooks wrap the
real code, so what is on disk when the process dies is exactly what a crash at that point leaves:

- ``step``: inside the N-th training step, after the forward pass and before backward.
- ``ckpt_tmp``: the N-th safetensors temp file is fully written, not yet renamed (checkpoint.save_file).
- ``ckpt_rename``: just after the N-th checkpoint rename (os.replace onto a ``.safetensors``).
- ``shard_tmp``: the N-th activation/view file is half written to its temp name.
- ``shard_add``: just after the N-th ShardWriter.add (shards on disk, no manifest yet).
- ``shard_swap``: in the N-th ShardWriter.close, between moving the old set away and the new one in.
- ``state_save``: just after the N-th resumable stage-state save (single backend).
"""

import os
import runpy
import signal
import sys


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _count(n):
    calls = [0]

    def hit():
        calls[0] += 1
        return calls[0] == n

    return hit


def install(point: str, n: int) -> None:
    hit = _count(n)
    if point == "step":
        from stackwise import objective

        real_loss = objective.masked_loss

        def masked_loss(*a, **kw):
            out = real_loss(*a, **kw)
            if hit():
                _die()
            return out

        objective.masked_loss = masked_loss
    elif point == "ckpt_tmp":
        from stackwise.engine import checkpoint

        real_save = checkpoint.save_file

        def save_file(tensors, path, metadata=None):
            real_save(tensors, path, metadata=metadata)
            if hit():
                _die()

        checkpoint.save_file = save_file
    elif point in ("ckpt_rename", "shard_swap"):
        real_replace, real_rename = os.replace, os.rename

        def replace(src, dst, *a, **kw):
            real_replace(src, dst, *a, **kw)
            if point == "ckpt_rename" and str(dst).endswith(".safetensors") and hit():
                _die()

        def rename(src, dst, *a, **kw):
            if point == "shard_swap" and str(src).endswith(".partial") and hit():
                _die()
            real_rename(src, dst, *a, **kw)

        os.replace, os.rename = replace, rename
    elif point == "shard_tmp":
        from stackwise.data import activations

        real_write = activations._atomic_write_bytes

        def write(path, data):
            if hit():
                with open(f"{path}.tmp-{os.getpid()}", "wb") as f:
                    f.write(data[: len(data) // 2])
                _die()
            real_write(path, data)

        activations._atomic_write_bytes = write
    elif point == "shard_add":
        from stackwise.data import activations

        real_add = activations.ShardWriter.add

        def add(self, arrays, index=None):
            real_add(self, arrays, index)
            if hit():
                _die()

        activations.ShardWriter.add = add
    elif point == "state_save":
        from stackwise.engine.backends import single

        real_state = single._save_state

        def save_state(*a, **kw):
            real_state(*a, **kw)
            if hit():
                _die()

        single._save_state = save_state
    else:
        raise SystemExit(f"unknown kill point {point!r}")


if __name__ == "__main__":
    point, n, launcher = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    install(point, n)
    sys.argv = [launcher, *sys.argv[4:]]
    runpy.run_path(launcher, run_name="__main__")
