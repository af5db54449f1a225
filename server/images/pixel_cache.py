"""Decoded pixels of recently seen images, so a conversation that sends its image again with
every turn (as the OpenAI API has clients do) decodes it once.

A 12 MP phone photo costs ~40 ms to decode and downsize on this kind of CPU, on every turn;
hashing its bytes costs ~0.5 ms. Entries are keyed by tenant (a client must not learn from
timing what another one sent), content hash and size rule, and bounded by bytes (LRU).
Thread-safe: decodes run in worker threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable

from server.images.decode import DecodedImage

__all__ = ["PixelCache"]


class PixelCache:
    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Hashable, DecodedImage] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> DecodedImage | None:
        with self._lock:
            image = self._entries.get(key)
            if image is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return image

    def put(self, key: Hashable, image: DecodedImage) -> None:
        size = len(image.rgb)
        if size > self.max_bytes:  # also: max_bytes 0 turns the cache off
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= len(old.rgb)
            self._entries[key] = image
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self.bytes -= len(evicted.rgb)
