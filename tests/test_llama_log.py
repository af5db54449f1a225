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
    """A next-turn guess interrupted on purpose makes llama.cpp log errors; they are held
    and logged as debug lines, so an operator's log shows no error for it. The same lines
    from a decode that was not interrupted keep their level."""
    caplog.set_level(logging.DEBUG, logger="vlserve.llama")
    for expected in (True, False):
        caplog.clear()
        with llama_log.held() as lines:
            emit(ERROR, "process_ubatch: failed to compute graph, compute status: 1\n")
            emit(WARN, "decode: removing memory module entries for seq_id = 0\n")
        assert records(caplog) == []  # nothing logged while held
        llama_log.release(lines, expected=expected)
        levels = [level for level, _ in records(caplog)]
        assert levels == ([logging.DEBUG] * 2 if expected else [logging.ERROR, logging.WARNING])
        assert "failed to compute graph" in records(caplog)[0][1]


def test_other_threads_lines_are_not_held(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vlserve.llama")
    with llama_log.held() as lines:
        worker = threading.Thread(target=emit, args=(ERROR, "clip: something real\n"))
        worker.start()
        worker.join()
    assert lines == []
    assert records(caplog) == [(logging.ERROR, "clip: something real")]
