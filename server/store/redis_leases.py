"""Keys a holder owns for a while, in Redis (a random token, an expiry): taken only when
free, kept and dropped only by the token that holds them, so a holder whose key expired
and was taken by another can neither extend nor free its successor's hold."""

from __future__ import annotations

import redis.asyncio as aioredis

from server.store.redis_table import guarded

# KEYS: key. ARGV: token ttl_ms.  1: held by `token` for ttl_ms from now (it was its own,
# or free again: a hold that expired unseen is taken back), 0: another token holds it.
KEEP = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# KEYS: key. ARGV: token.  1: dropped, 0: not this token's (expired, or another's now).
DROP = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class RedisLeases:
    """The keys under `vlserve:<name>:`; each call is StateUnavailable when Redis is out of
    reach (server.store.redis_table.guarded)."""

    def __init__(self, client: aioredis.Redis, name: str, timeout_s: float) -> None:
        self._client = client
        self._prefix = f"vlserve:{name}:"
        self._timeout_s = timeout_s
        self._keep = client.register_script(KEEP)
        self._drop = client.register_script(DROP)

    async def take(self, key: str, token: str, ttl_s: float) -> bool:
        """Hold `key` for ttl_s unless someone holds it (False)."""
        taken = await guarded(lambda: self._client.set(
            self._prefix + key, token, nx=True, px=_ms(ttl_s)), self._timeout_s)
        return bool(taken)

    async def keep(self, key: str, token: str, ttl_s: float) -> bool:
        """Hold `key` ttl_s from now if `token` holds it or nobody does (False: another)."""
        return bool(await guarded(lambda: self._keep(
            keys=[self._prefix + key], args=[token, _ms(ttl_s)]), self._timeout_s))

    async def drop(self, key: str, token: str) -> bool:
        """Free `key` if `token` still holds it."""
        return bool(await guarded(lambda: self._drop(
            keys=[self._prefix + key], args=[token]), self._timeout_s))


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))  # PX takes whole milliseconds, at least one
