"""The image-embedding LRU stays within its byte budget and evicts the oldest first."""

from __future__ import annotations

from server.engine.embed_cache import EmbeddingCache


def test_lru_eviction_by_bytes() -> None:
    cache = EmbeddingCache(max_bytes=10)
    cache.put(("a", 0), b"1234")
    cache.put(("b", 0), b"5678")
    assert cache.get(("a", 0)) == b"1234"  # a is now the most recent
    cache.put(("c", 0), b"90ab")
    assert ("b", 0) not in cache and ("a", 0) in cache and ("c", 0) in cache
    assert cache.used_bytes == 8
    assert (cache.hits, cache.misses) == (1, 0)
    assert cache.get(("b", 0)) is None and cache.misses == 1


def test_oversized_entry_is_not_cached_and_replacing_updates_size() -> None:
    cache = EmbeddingCache(max_bytes=4)
    cache.put(("big", 0), b"12345")
    assert len(cache) == 0
    cache.put(("x", 0), b"12")
    cache.put(("x", 0), b"123")
    assert cache.used_bytes == 3 and len(cache) == 1
