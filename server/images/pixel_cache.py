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


class PixelCache:
    def __init__(self, max_bytes: int) -> None:
        self._lru: ByteLRU[Hashable, DecodedImage] = ByteLRU(max_bytes,
                                                             lambda image: len(image.rgb))
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    @property
    def bytes(self) -> int:
        return self._lru.used_bytes

    @property
    def hits(self) -> int:
        return self._lru.hits

    @property
    def misses(self) -> int:
        return self._lru.misses

    def get(self, key: Hashable) -> DecodedImage | None:
        with self._lock:
            return self._lru.get(key)

    def put(self, key: Hashable, image: DecodedImage) -> None:
        with self._lock:
            self._lru.put(key, image)
