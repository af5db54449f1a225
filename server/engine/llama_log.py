"""Route llama.cpp / mtmd log lines into Python logging instead of raw stderr.

While a `record()` block is open, every complete line (debug included) is also kept, so the
load log can be read back: it is the only place llama.cpp says where it put the layers and
which backend the vision encoder got (see server/engine/placement.py).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import llama_cpp
from llama_cpp import mtmd_cpp

logger = logging.getLogger("vlserve.llama")

# ggml_log_level in the vendored ggml.h (llama-cpp-python's own _logger.py still has the
# older numbering): 1 debug, 2 info, 3 warn, 4 error, 5 continuation of the previous line.
_LEVELS = {0: logging.CRITICAL, 1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING,
           4: logging.ERROR}
_state = {"level": logging.INFO, "buffer": ""}
_recorders: list[list[str]] = []
_hushed: set[int] = set()  # threads whose llama.cpp lines are expected (see hush)


@llama_cpp.llama_log_callback
def _on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    if level != 5:
        _state["level"] = _LEVELS.get(level, logging.INFO)
    # llama.cpp's info lines are chatty (one per tensor): show them only at debug.
    py_level = logging.DEBUG if _state["level"] == logging.INFO else _state["level"]
    buffered = _state["buffer"] + text.decode("utf-8", errors="replace")
    *lines, _state["buffer"] = buffered.split("\n")
    for recorder in _recorders:
        recorder.extend(line for line in lines if line.strip())
    if _hushed and threading.get_ident() in _hushed:
        py_level = logging.DEBUG
    if logger.isEnabledFor(py_level):
        for line in lines:
            if line.strip():
                logger.log(py_level, "%s", line)


def install() -> None:
    """Send llama.cpp, mtmd and mtmd-helper logs to the `vlserve.llama` logger."""
    llama_cpp.llama_log_set(_on_log, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_log_set(_on_log, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(_on_log, ctypes.c_void_p(0))


@contextmanager
def record() -> Iterator[list[str]]:
    """Keep every llama.cpp / mtmd line logged inside the block (whatever the log level).

    Lines come from the thread that calls into llama.cpp; the one engine thread does, so
    the list is only appended to from there and read after the block.
    """
    install()
    lines: list[str] = []
    _recorders.append(lines)
    try:
        yield lines
    finally:
        _recorders.remove(lines)


def hush(thread: int) -> None:
    """What llama.cpp logs from `thread` from now on reports what the caller asked for (an
    abort): debug lines, whatever their level, until `unhush`. Logged at once, not held:
    a process that dies meanwhile still leaves them."""
    _hushed.add(thread)


def unhush(thread: int) -> None:
    _hushed.discard(thread)
