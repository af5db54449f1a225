"""The API keys the server accepts, rotated without a restart: keys from the settings
(`api_keys`, `api_key`) hold for the process's life; those from `api_key_file` are read
again when the file changes (its size, mtime or inode, looked at every
`api_key_file_poll_s`; a Kubernetes secret volume swaps the file so), once it has stayed
the same for one more look (an editor still writing it is not read half-way), or at once
on SIGHUP. A file that cannot be read, holds no key or a bad one keeps the keys in force
(logged): rotation never switches auth off or locks everyone out by accident.

A key's stored files, responses and conversations belong to that key (the identity is a
digest of it): a new key does not see what an old one stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from server.config import Settings, read_key_file

logger = logging.getLogger("vlserve")


class KeyRing:
    def __init__(self, fixed: list[str], key_file: Path | None,
                 file_keys: list[str] | None = None, poll_s: float = 2.0) -> None:
        self._fixed = fixed
        self.key_file = key_file
        self.poll_s = poll_s
        self._file_keys = file_keys or []
        self._seen = self._signature()
        self.keys = self._combined()
        # Told the number of keys in force after each change (the stores' per-key shares).
        self.on_change: Callable[[int], None] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        fixed = settings.fixed_api_keys
        if settings.api_key_file is None:
            return cls(fixed, None)
        file_keys = [key.get_secret_value() for key in settings.api_keys
                     if key.get_secret_value() not in fixed]
        return cls(fixed, settings.api_key_file, file_keys, settings.api_key_file_poll_s)

    def reload(self, why: str) -> bool:
        """Read the key file again; whether the accepted keys changed."""
        if self.key_file is None:
            return False
        self._seen = self._signature()
        try:
            from_file = read_key_file(self.key_file)
            if any(any(c.isspace() for c in key) for key in from_file):
                raise ValueError("a key contains whitespace")
            from_file = [key for key in from_file if key not in self._fixed]  # held anyway
        except ValueError as exc:
            logger.error("api_key_file not reloaded (%s): %s; the %d key(s) in force stay",
                         why, exc, len(self.keys))
            return False
        if from_file == self._file_keys:
            return False
        before = self.keys
        added = len(set(from_file) - set(self._file_keys))
        removed = len(set(self._file_keys) - set(from_file))
        self._file_keys = from_file
        self.keys = self._combined()
        logger.info("api_key_file reloaded (%s): %d key(s) added, %d removed, %d in force",
                    why, added, removed, len(self.keys))
        if self.on_change is not None and len(self.keys) != len(before):
            self.on_change(len(self.keys))
        return True

    async def watch(self) -> None:
        """Until cancelled: reload once the file has changed and then stayed the same for
        one more look."""
        changed_to: tuple[int, int, int] | None = None
        while True:
            await asyncio.sleep(self.poll_s)
            now = self._signature()
            if now == self._seen:
                changed_to = None
            elif now == changed_to:
                self.reload("the file changed")
            else:
                changed_to = now

    def _combined(self) -> tuple[bytes, ...]:
        return tuple(key.encode() for key in dict.fromkeys(self._fixed + self._file_keys))

    def _signature(self) -> tuple[int, int, int] | None:
        if self.key_file is None:
            return None
        try:
            # stat() follows links: a secret volume's swapped target shows as a new inode.
            info = os.stat(self.key_file)
        except OSError:
            return None
        return info.st_ino, info.st_size, info.st_mtime_ns


@contextlib.asynccontextmanager
async def key_rotation(keyring: KeyRing) -> AsyncIterator[None]:
    """While the server runs: the key file watched, and SIGHUP (`supervisorctl signal HUP`,
    `docker kill -s HUP`, `kill -HUP`) reloads it at once; without a key file SIGHUP is
    ignored rather than ending the process (its default)."""
    loop = asyncio.get_running_loop()
    watching = asyncio.create_task(keyring.watch(), name="api key file") \
        if keyring.key_file is not None else None
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        loop.add_signal_handler(signal.SIGHUP, keyring.reload, "SIGHUP")
    try:
        yield
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
            # Ignored, not back to its default: a HUP from a rotation script during the
            # rest of the shutdown (the snapshot's last write) must not end the process.
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if watching is not None:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
