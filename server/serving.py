"""Run uvicorn with a drain phase: SIGTERM → refuse new work (503) → in-flight done → exit 0.

Plain uvicorn (0.54) on SIGTERM closes its listening socket at once (new clients get
"connection refused", not a 503), waits for open connections up to
`timeout_graceful_shutdown`, and afterwards re-raises the signal, so the process dies of
SIGTERM (exit status 143) rather than exiting 0. Here the first SIGTERM/SIGINT only starts
the drain: the socket stays open and `DrainMiddleware` answers 503 to new requests, until
the requests in flight are done or `drain_timeout` has passed; then uvicorn's own shutdown
runs (listener closed, lifespan shutdown stops the engine) and the process exits 0. A second
signal skips the wait, as in plain uvicorn, and the process dies of that signal.
"""

from __future__ import annotations

import logging
from types import FrameType

import uvicorn

from server.api.drain import Drain
from server.config import Settings
from server.http_protocol import ConnectionLimits, protocol_options

logger = logging.getLogger("vlserve")

# Once draining is over, what uvicorn's own shutdown may still wait for connections to close.
_SHUTDOWN_GRACE = 1.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, drain_timeout: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_timeout = drain_timeout

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.draining or self.should_exit:
            logger.warning("second signal %d: stopping without waiting for requests", sig)
            self.force_exit = True
            super().handle_exit(sig, frame)
            return
        # Not super(): that would record the signal, and uvicorn re-raises recorded signals
        # once it has shut down, turning a clean drain into death by SIGTERM.
        self.drain.start()
        logger.info("signal %d: draining %d request(s) in flight (up to %.0f s), new requests "
                    "get 503", sig, self.drain.in_flight, self.drain_timeout)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if self.drain.in_flight == 0:
                logger.info("drained after %.1f s, shutting down", self.drain.elapsed())
                self.should_exit = True
            elif self.drain.elapsed() >= self.drain_timeout:
                logger.warning("drain timeout (%.0f s) passed with %d request(s) in flight: "
                               "cancelling them", self.drain_timeout, self.drain.in_flight)
                self.should_exit = True
        return await super().on_tick(counter)


def connection_limits(settings: Settings) -> ConnectionLimits:
    return ConnectionLimits(max_header_bytes=settings.max_header_bytes,
                            header_timeout=settings.header_timeout,
                            body_timeout=settings.body_timeout,
                            write_timeout=settings.write_timeout,
                            max_connections=settings.max_connections,
                            max_pipelined=settings.max_pipelined_requests)


def make_server(app: object, *, host: str, port: int, log_level: str, drain: Drain,
                drain_timeout: float, limits: ConnectionLimits | None = None
                ) -> DrainingServer:
    # Chat requests get their own JSON line; uvicorn's access line would only repeat it
    # (and log every /metrics scrape), so it is kept for debugging. No `server` header: what
    # runs the server is nobody else's business.
    config = uvicorn.Config(app, host=host, port=port, log_config=None, log_level=log_level,
                            access_log=log_level == "debug", server_header=False,
                            timeout_graceful_shutdown=_SHUTDOWN_GRACE,
                            **protocol_options(limits or ConnectionLimits()))
    return DrainingServer(config, drain, drain_timeout)
