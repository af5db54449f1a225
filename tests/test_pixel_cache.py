"""The decoded-pixel cache's bound and order (server/images/pixel_cache.py)."""

from __future__ import annotations

from server.images.decode import DecodedImage
from server.images.pixel_cache import PixelCache


def image(n_bytes: int) -> DecodedImage:
    return DecodedImage(bytes(n_bytes), n_bytes // 3, 1, "hash", 0.01, 0.01)


def test_least_recently_used_goes_first_when_over_the_byte_bound() -> None:
    cache = PixelCache(max_bytes=300)
    for key in ("a", "b", "c"):
        cache.put(key, image(99))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", image(99))
    assert cache.get("b") is None
    assert all(cache.get(k) is not None for k in ("a", "c", "d"))
    assert cache.bytes == 297 and len(cache) == 3
    assert (cache.hits, cache.misses) == (4, 1)


def test_replacing_an_entry_counts_its_bytes_once() -> None:
    cache = PixelCache(max_bytes=300)
    cache.put("a", image(99))
    cache.put("a", image(150))
    assert cache.bytes == 150 and len(cache) == 1


def test_an_image_larger_than_the_cache_is_not_kept_and_zero_turns_it_off() -> None:
    cache = PixelCache(max_bytes=100)
    cache.put("small", image(90))
    cache.put("big", image(300))
    assert cache.get("big") is None and cache.get("small") is not None
    off = PixelCache(max_bytes=0)
    off.put("a", image(3))
    assert off.get("a") is None and off.bytes == 0
