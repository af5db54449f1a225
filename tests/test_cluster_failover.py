"""RouterWorkers' bookkeeping against a stand-in router (httpx.MockTransport): which calls
it makes, when, and what it does when the router does not answer. The real router and
replicas are in tests/test_cluster.py::test_kill_9_of_a_replica."""

from __future__ import annotations

import logging

import httpx
import pytest

from server.cluster import failover
from server.cluster.failover import RouterWorkers

ROUTER = "http://127.0.0.1:9000"
REPLICA = "http://127.0.0.1:9001"


class StandIn:
    """The router's admin calls and a replica's /health, recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.healthy = False
        self.router_up = True

    def __call__(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        self.calls.append(f"{request.method} {url.path} {url.params.get('url', '')}".strip())
        if url.port == 9001:
            return httpx.Response(200 if self.healthy else 503)
        if not self.router_up:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, text="ok")


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> StandIn:
    monkeypatch.setattr(failover, "CHECK_EVERY_S", 0.0)  # every call checks
    return StandIn()


def workers(stand_in: StandIn) -> RouterWorkers:
    return RouterWorkers(ROUTER, httpx.Client(transport=httpx.MockTransport(stand_in)))


def test_removed_at_once_and_added_back_only_when_healthy(stand_in: StandIn) -> None:
    router = workers(stand_in)
    assert router.remove(REPLICA)
    assert router.remove(REPLICA)  # a second death while out: no second call
    assert stand_in.calls == [f"POST /remove_worker {REPLICA}"]
    assert router.restore_ready() == []  # loading: /health 503, nothing added
    stand_in.healthy = True
    assert router.restore_ready() == [REPLICA]
    assert router.restore_ready() == []  # once
    assert stand_in.calls[1:] == ["GET /health", "GET /health",
                                  f"POST /add_worker {REPLICA}"]


def test_a_router_that_does_not_answer_is_logged_not_fatal(
        stand_in: StandIn, caplog: pytest.LogCaptureFixture) -> None:
    router = workers(stand_in)
    stand_in.router_up = False
    with caplog.at_level(logging.WARNING, "vlserve.cluster"):
        assert not router.remove(REPLICA)
    assert f"router remove_worker {REPLICA} failed" in caplog.text
    assert router.removed == {}  # not out: nothing to add back later

    stand_in.router_up = True
    assert router.remove(REPLICA)
    stand_in.healthy, stand_in.router_up = True, False
    assert router.restore_ready() == []  # the add failed: tried again next time
    stand_in.router_up = True
    assert router.restore_ready() == [REPLICA]


def test_a_restarted_router_lists_everyone_again(stand_in: StandIn) -> None:
    router = workers(stand_in)
    router.remove(REPLICA)
    router.forget()
    stand_in.healthy = True
    assert router.restore_ready() == []
