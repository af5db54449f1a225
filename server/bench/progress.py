"""A progress bar on stderr while the bench runs: tqdm when installed, else a line per step."""

from __future__ import annotations

import sys
from typing import Any


class Progress:
    def __init__(self, total: int, enabled: bool = True) -> None:
        self._bar: Any = None
        self._enabled = enabled
        # A bar redrawn into a log file (CI, nohup) is noise: lines there instead.
        if not enabled or not sys.stderr.isatty():
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True,
                         leave=False)

    def total(self, requests: int) -> None:
        """The number of requests, once the server says which scenarios apply."""
        if self._bar is not None:
            self._bar.total = requests
            self._bar.refresh()

    def stage(self, name: str) -> None:
        if self._bar is not None:
            self._bar.set_description(name)
        elif self._enabled:
            print(f"bench: {name} ...", file=sys.stderr, flush=True)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
