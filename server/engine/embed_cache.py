"""Image embeddings by content hash, LRU-bounded by bytes: a known image skips the encoder."""

from __future__ import annotations

from collections import OrderedDict

# (tenant, image content hash, index of the chunk within that image): a tenant's images are
# never another's cache hit, or the hit (timings, upload status) would tell it what was sent.
EmbedKey = tuple[str, str, int]


class EmbeddingCache:
    """Plain bytes of float32 embeddings; the engine thread is the only user."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used_bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[EmbedKey, bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: EmbedKey) -> bool:
        return key in self._items

    def get(self, key: EmbedKey) -> bytes | None:
        data = self._items.get(key)
        if data is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return data

    def put(self, key: EmbedKey, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return  # larger than the whole budget: caching it would evict everything
        old = self._items.pop(key, None)
        if old is not None:
            self.used_bytes -= len(old)
        self._items[key] = data
        self.used_bytes += len(data)
        while self.used_bytes > self.max_bytes:
            _, evicted = self._items.popitem(last=False)
            self.used_bytes -= len(evicted)
