"""llama.cpp's log lines in Python logging (server/engine/llama_log.py)."""

from __future__ import annotations

import logging
import threading

import pytest

from server.engine import llama_log

ERROR, WARN = 4, 3  # ggml_log_level


def emit(level: int, text: str) -> None:
    llama_log._on_log(level, text.encode(), None)


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "vlserve.llama"]


def test_an_abort_asked_for_logs_its_errors_as_debug(caplog: pytest.LogCaptureFixture) -> None:
    """A next-turn guess interrupted on purpose makes llama.cpp log errors: once the abort
    is asked for, the engine thread's lines are debug lines, so an operator's log shows no
    error for it. Lines before it, after it and from other threads keep their level."""
    caplog.set_level(logging.DEBUG, logger="vlserve.llama")
    me = threading.get_ident()
    emit(WARN, "before the abort\n")
    llama_log.hush(me)
    try:
        emit(ERROR, "process_ubatch: failed to compute graph, compute status: 1\n")
        other = threading.Thread(target=emit, args=(ERROR, "clip: something real\n"))
        other.start()
        other.join()
    finally:
        llama_log.unhush(me)
    emit(ERROR, "after it\n")
    assert records(caplog) == [
        (logging.WARNING, "before the abort"),
        (logging.DEBUG, "process_ubatch: failed to compute graph, compute status: 1"),
        (logging.ERROR, "clip: something real"),
        (logging.ERROR, "after it"),
    ]
