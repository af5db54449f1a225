"""Notices a call into llama.cpp that never returns (a wedged GPU driver, a deadlock).

The engine thread wraps each decode step and image encode in `watch()`; a monitor thread
checks the clock. A call running past `limit_s` fires `on_hang` once, from the monitor
thread: the engine thread is stuck in C code and cannot report anything itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("vlserve.engine")


class Watchdog:
    def __init__(self, limit_s: float, on_hang: Callable[[str, float], None]) -> None:
        """`limit_s` 0 turns it off."""
        self.limit_s = limit_s
        self._on_hang = on_hang
        # (what, since): written by the engine thread, read by the monitor; a tuple is
        # replaced whole, so the monitor never sees half an update.
        self._current: tuple[str, float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.limit_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vlserve-watchdog",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def watch(self, what: str) -> _Watch:
        """`with watchdog.watch("a decode step"): ...` (a plain class, not a generator
        context manager: it wraps every engine step)."""
        return _Watch(self, what)

    def _run(self) -> None:
        poll = min(1.0, self.limit_s / 4)
        while not self._stop.wait(poll):
            current = self._current
            if current is None:
                continue
            what, since = current
            elapsed = time.monotonic() - since
            if elapsed > self.limit_s:
                logger.critical("engine hung: %s has not returned after %.1f s "
                                "(engine_watchdog_s = %g)", what, elapsed, self.limit_s)
                self._on_hang(what, elapsed)
                return


class _Watch:
    __slots__ = ("_dog", "_what")

    def __init__(self, dog: Watchdog, what: str) -> None:
        self._dog = dog
        self._what = what

    def __enter__(self) -> None:
        self._dog._current = (self._what, time.monotonic())

    def __exit__(self, *exc: object) -> None:
        self._dog._current = None
