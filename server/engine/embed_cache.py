"""Image embeddings by content hash, LRU-bounded by bytes: a known image skips the encoder."""

from __future__ import annotations

from server.byte_lru import ByteLRU

# (tenant, image content hash, index of the chunk within that image): a tenant's images are
# never another's cache hit, or the hit (timings, upload status) would tell it what was sent.
EmbedKey = tuple[str, str, int]


class EmbeddingCache(ByteLRU[EmbedKey, bytes]):
    """Plain bytes of float32 embeddings; the engine thread is the only user."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(max_bytes, len)
