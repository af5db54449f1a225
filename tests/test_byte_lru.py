"""The byte-bounded LRUs (server/byte_lru.py) of image embeddings and decoded pixels stay
within their budgets and evict the least recently used first."""

from __future__ import annotations

from server.engine.embed_cache import EmbeddingCache
from server.images.decode import DecodedImage
from server.images.pixel_cache import PixelCache


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


def image(n_bytes: int) -> DecodedImage:
    return DecodedImage(bytes(n_bytes), n_bytes // 3, 1, "hash", 0.01, 0.01)


def test_decoded_pixels_weigh_their_rgb_bytes_and_zero_turns_the_cache_off() -> None:
    cache = PixelCache(max_bytes=300)
    for key in ("a", "b", "c"):
        cache.put(key, image(99))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", image(99))
    assert cache.get("b") is None
    assert cache.used_bytes == 297 and len(cache) == 3 and (cache.hits, cache.misses) == (1, 1)
    off = PixelCache(max_bytes=0)
    off.put("a", image(3))
    assert off.get("a") is None and off.used_bytes == 0
