"""Decoded pixels of recently seen images, so a conversation that sends its image again with
every turn (as the OpenAI API has clients do) decodes it once.

A 12 MP phone photo costs ~40 ms to decode and downsize to 1024 pixels on this kind of CPU,
on every turn; hashing its bytes costs ~0.5 ms. Entries are keyed by tenant (a client must
not learn from timing what another one sent), content hash and size rule, and bounded by
bytes (LRU). Thread-safe: decodes run in worker threads.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable

from server.byte_lru import ByteLRU
from server.images.decode import DecodedImage

__all__ = ["PixelCache"]


class PixelCache(ByteLRU[Hashable, DecodedImage]):
    """A byte-bounded LRU whose reads and writes take a lock (worker threads share it)."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, lambda image: len(image.rgb))
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> DecodedImage | None:
        with self._lock:
            return super().get(key)

    def put(self, key: Hashable, image: DecodedImage) -> None:
        with self._lock:
            super().put(key, image)
