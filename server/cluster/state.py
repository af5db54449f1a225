"""The cluster's own redis-server (`vlserve cluster --redis`, and the supervisord group's
program with the same flags): the replicas' shared state on loopback."""

from __future__ import annotations

import shutil
from pathlib import Path

from server.batches.quota import batch_store_mb
from server.config import Settings

# Above what vlserve itself bounds (uploads, stored responses, conversations, stored chat
# completions, batch files): Redis's own overhead per key, its allocator's slack and the
# Lua scripts' working memory (README "Shared state").
HEADROOM_MB = 256


def maxmemory_mb(settings: Settings) -> int:
    """Redis's memory bound for these settings: vlserve's store bounds plus headroom, so
    Redis refuses a write (503 from the replica) only if vlserve's own bounds failed."""
    return (settings.upload_store_mb + settings.responses_store_mb
            + settings.conversations_store_mb + settings.chat_completions_store_mb
            + batch_store_mb(settings, shared=True) + HEADROOM_MB)


def redis_argv(port: int, workdir: Path, maxmemory: int, binary: str | None = None
               ) -> list[str]:
    """A loopback redis-server for one box's cluster: nothing saved to disk, `maxmemory`
    MB, and no eviction of its own (vlserve bounds what it stores and evicts by itself)."""
    binary = binary or shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (Debian: apt-get install "
                                "redis-server)")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--maxmemory", f"{maxmemory}mb",
            "--maxmemory-policy", "noeviction"]
