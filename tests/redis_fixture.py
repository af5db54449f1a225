"""The `redis` fixture every shared-state test module uses: a throwaway redis-server per
module (tests/redis_server.py). A plugin of conftest.py, so no module imports it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_server import RedisServer, start_redis


@pytest.fixture(scope="module")
def redis(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = start_redis(tmp_path_factory.mktemp(f"redis-{request.module.__name__}"))
    yield server
    server.stop()
