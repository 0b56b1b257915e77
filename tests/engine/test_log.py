# SPDX-License-Identifier: MIT
"""The stackwise logger writes to the stderr of the moment, not the one it first saw."""

import contextlib
import io

from stackwise.engine.log import _CurrentStderr, format_step, init_logging


def test_log_lines_follow_a_swapped_stderr():
    log = init_logging(0)
    first, second = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(first):
        log.info("one")
    first.close()  # a runner or notebook closes the stream it lent; the next record must not touch it
    with contextlib.redirect_stderr(second):
        init_logging(0).info("two")
    assert "two" in second.getvalue() and second.getvalue().startswith("[stackwise r0] ")
    # init_logging twice adds no second handler of its own (pytest's capture may have added others)
    assert sum(isinstance(h, _CurrentStderr) for h in log.handlers) == 1


def test_progress_line_format():
    line = format_step(120, 2000, 5, 3.21414, 3e-4, 0.84, 412.0, 158_000.0, mem_gib=1.31, mfu=0.382)
    assert line == ("step 120/2000 | layer 05 | loss 3.2141 | lr 3.00e-04 | gnorm 0.84 | 412 ms | 158.0k tok/s"
                    " | mfu 38.2% | mem 1.3 GiB")
