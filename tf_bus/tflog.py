"""Import TensorFlow with its C++ log level honoured.

TensorFlow 2.21 logs through Abseil before Abseil's logging is initialised, so a plain
``import tensorflow`` writes, twice, ``WARNING: All log messages before absl::InitializeLog()
is called are written to STDERR`` and an INFO line (``port.cc:...] oneDNN custom operations
are on ...``) whatever ``TF_CPP_MIN_LOG_LEVEL`` says. ``import_tensorflow`` imports it with
file descriptor 2 led through a pipe that drops exactly the lines the level asks to hide
(INFO at 1, WARNING too at 2, ERROR too at 3, and the Abseil notice at 1 and above) and
passes every other byte on as it comes. `tf-bus` calls it before a command that needs
TensorFlow, so ``TF_CPP_MIN_LOG_LEVEL=2`` (the CLI's default) means a quiet start again.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import threading
from typing import Iterator

ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
# Abseil's prefix: severity, MMDD, time, thread id, file:line] (e.g. "I0000 00:00:1796.6 21805 port.cc:153] ").
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} \d\d:\d\d:[\d.]+ +\d+ [\w./-]+:\d+\] ")
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


def min_log_level(environ: dict | None = None) -> int:
    """``TF_CPP_MIN_LOG_LEVEL`` as TensorFlow reads it: 0 (everything) when unset or not a number."""
    text = (os.environ if environ is None else environ).get("TF_CPP_MIN_LOG_LEVEL", "0").strip()
    return int(text) if text.isdigit() else 0


def hidden(line: bytes, level: int) -> bool:
    """Whether TensorFlow at ``TF_CPP_MIN_LOG_LEVEL=level`` should not have shown ``line``."""
    if level <= 0:
        return False
    if line.rstrip(b"\r\n") == ABSL_NOTICE:
        return True
    match = _ABSL_LINE.match(line)
    return bool(match) and _SEVERITY[match.group(1)] < level


@contextlib.contextmanager
def filtered_stderr(level: int) -> Iterator[None]:
    """Within the block, lines written to file descriptor 2 (by C++ too) that ``level`` hides
    are dropped; everything else reaches the real stderr as it is written."""
    if level <= 0:
        yield
        return
    try:
        if sys.stderr is not None:
            sys.stderr.flush()
        real = os.dup(2)
    except (OSError, ValueError):  # no stderr at all (closed by a daemon): nothing to filter
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def forward(data: bytes) -> None:
        try:
            os.write(real, data)
        except OSError:  # the real stderr went away: keep draining, so that no writer blocks
            pass

    def pump() -> None:
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending = b""
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not hidden(line, level):
                        forward(line + b"\n")
            if pending and not hidden(pending, level):
                forward(pending)

    thread = threading.Thread(target=pump, name="tf-bus-stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        if sys.stderr is not None:
            sys.stderr.flush()
        os.dup2(real, 2)  # closes the pipe's write end: the pump reads to its end and stops
        thread.join(timeout=10)
        if not thread.is_alive():
            os.close(real)


def import_tensorflow():
    """``import tensorflow``, without the log lines ``TF_CPP_MIN_LOG_LEVEL`` hides. A no-op
    (the module) once TensorFlow is imported."""
    if sys.modules.get("tensorflow") is not None:
        return sys.modules["tensorflow"]
    with filtered_stderr(min_log_level()):
        import tensorflow
    return tensorflow
