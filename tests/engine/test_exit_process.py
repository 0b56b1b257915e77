# SPDX-License-Identifier: MIT
"""distributed.exit_process: a launcher that joined a process group leaves with status 0, its output flushed and
the interpreter's finalization skipped; one that never joined a group returns and exits as usual."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = """
import atexit, sys
from stackwise.engine import distributed
atexit.register(lambda: print("finalized", flush=True))
distributed._joined_world = {joined}
print("work done")          # buffered (stdout is a pipe): must reach the parent
sys.stderr.write("log line\\n")
distributed.exit_process()
print("after exit_process")
"""


def _run(joined: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(joined=joined)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_exit_after_a_process_group_flushes_and_skips_finalization():
    p = _run(True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["work done"], p.stdout  # flushed; nothing after it ran, no atexit handler
    assert "log line" in p.stderr


def test_no_process_group_returns_and_finalizes():
    p = _run(False)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["work done", "after exit_process", "finalized"], p.stdout
