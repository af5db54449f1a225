"""Connection-level limits, where requests are parsed: uvicorn's httptools protocol, subclassed.

What no ASGI middleware can bound, because it happens before (or beside) the application:
- the request head's size (`max_header_bytes`: 431): llhttp accepts headers of any size;
- time: the head must arrive within `header_timeout`, a body within `body_timeout` of its
  headers (408 when nothing else is being answered, then the connection is closed), and a
  client that reads nothing of its answer for `write_timeout` is cut (the app sees a
  disconnect: a stream is cancelled, its engine request with it);
- pipelining: uvicorn parses every request a read holds and queues them all, ~2 KB each, so
  one socket sending 60,000 × `GET /health` without reading held 115 MiB. Reads are fed to
  the parser in slices and held back once `max_pipelined` requests wait, bytes past that
  (at most `_MAX_HELD_BYTES`) stay unread in the kernel;
- connections: beyond `max_connections` open at once a new one gets a 503 and is closed.
Timers count only while the client is the one keeping us waiting: while the server has
stopped reading (a pipelined request waits its turn, a body waits for the app), they restart.

When the server closes a connection, every request of it (the running one and those queued
behind it) is marked disconnected at once, so their writes are dropped quietly instead of
failing on a closed transport (uvicorn marks only the last one parsed). The app can ask
about its connection through `scope["vlserve.connection"]` (a `ConnectionState`).
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from server.http_answers import raw_431, raw_answer, refusal_431

try:  # the kernel's send queue, where it can be asked (Linux)
    from fcntl import ioctl
    from termios import TIOCOUTQ
except ImportError:  # pragma: no cover (Windows)
    ioctl = None  # type: ignore[assignment]

CONNECTION_KEY = "vlserve.connection"
_SLICE = 4096  # bytes fed to the parser at a time: a slice holds at most ~128 requests
_MAX_HELD_BYTES = 1024 * 1024  # unparsed bytes held back; more and the connection is closed
_CLOSE_GRACE = 1.0  # seconds a closed connection may take to flush its last answer

logger = logging.getLogger("vlserve.http")


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int = 16 * 1024
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    write_timeout: float = 30.0
    max_connections: int = 512
    max_pipelined: int = 16


def protocol_options(limits: ConnectionLimits) -> dict[str, Any]:
    """uvicorn.Config keyword arguments that apply `limits`."""
    try:
        import httptools  # noqa: F401  (uvicorn[standard] brings it)
    except ImportError:
        # h11 bounds the head, and uvicorn's own cap answers 503 past the connection limit;
        # the deadlines and the pipelining bound need httptools.
        return {"http": "h11", "h11_max_incomplete_event_size": limits.max_header_bytes,
                "limit_concurrency": limits.max_connections}
    bounded = type("BoundedHttpToolsProtocol", (BoundedProtocol,), {"limits": limits})
    return {"http": bounded}


def unsent_bytes(transport: asyncio.Transport) -> int:
    """Bytes written but not yet taken by the reader: the transport's buffer plus, on Linux,
    the kernel's send queue (megabytes on loopback), so that a slow reader's progress shows
    long before the kernel asks for more."""
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and ioctl is not None:
        try:
            queued = ioctl(sock.fileno(), TIOCOUTQ, b"\0\0\0\0")
            pending += struct.unpack("i", queued)[0]
        except (OSError, ValueError):
            pass  # not a socket that tells, or already closed: the buffer alone
    return pending


class ConnectionState:
    """One connection as its requests' code sees it."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.lost = False  # closed, by either side
        self.cut = False  # closed with what was written possibly undelivered
        self.timed_out = False  # closed by the server: the client was too slow to send

    @property
    def gone(self) -> bool:
        """Whether anything written now would be dropped."""
        return self.lost or self.cut

    async def delivered(self, timeout: float) -> bool:
        """Whether everything written so far left the server (the kernel took it); a
        reader that takes none of it for `timeout` seconds is cut off."""
        deadline = time.monotonic() + timeout
        progress = unsent_bytes(self._transport)
        while not self.cut:
            if self.lost or self._transport.get_write_buffer_size() == 0:
                return not self.cut  # a close that was not a cut flushed first
            if time.monotonic() >= deadline:
                self.cut = True
                self._transport.abort()
                break
            await asyncio.sleep(0.05)
            if not self.lost and (left := unsent_bytes(self._transport)) < progress:
                deadline, progress = time.monotonic() + timeout, left  # it reads, slowly
        return False


class _Flow(FlowControl):
    """uvicorn's flow control, except that reading stays paused while the protocol holds
    bytes back (an app waiting for its body would resume it), and that a closed transport
    is left alone (uvloop raises "unable to perform operation" on one)."""

    def __init__(self, transport: asyncio.Transport, protocol: BoundedProtocol) -> None:
        super().__init__(transport)
        self._protocol = protocol

    def pause_reading(self) -> None:
        if not self._transport.is_closing():
            super().pause_reading()

    def resume_reading(self) -> None:
        if not self._protocol.holding and not self._transport.is_closing():
            super().resume_reading()


class BoundedProtocol(HttpToolsProtocol):
    limits = ConnectionLimits()  # set by protocol_options
    _refused_since_log = 0  # connections refused since the last warning (all instances)
    _last_refusal_log = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head = True  # reading a request line and headers (not a body)
        self._head_bytes = 0
        self._held = bytearray()  # read but not yet parsed: the pipeline is full
        self._running: RequestResponseCycle | None = None  # the cycle whose app runs
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent = 0  # bytes waiting for the reader when the write timer was armed
        self._refused = False
        self.state: ConnectionState | None = None

    # --- connection -------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.limits.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)
        self.flow = _Flow(transport, self)
        self.state = ConnectionState(transport)
        # A connection that never sends a byte is a head that never arrives.
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_late)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused:
            return
        for timer in (self._head_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        if self.state is not None:
            self.state.lost = True
            self.state.cut = self.state.cut or exc is not None  # a reset loses what was sent
        if self._drop_requests():
            logger.debug("connection from %s closed under a request: its writes are dropped",
                         self._peer())
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        transport.write(raw_answer(503, "Service Unavailable", "too many open connections; "
                                    "retry shortly", "too_many_connections"))
        _close(transport)
        cls = BoundedProtocol
        cls._refused_since_log += 1
        now = time.monotonic()
        if now - cls._last_refusal_log >= 10:  # a flood must not flood the log too
            logger.warning("%d connection(s) refused: %d open (max_connections)",
                           cls._refused_since_log, len(self.connections))
            cls._refused_since_log, cls._last_refusal_log = 0, now

    # --- reading ----------------------------------------------------------------------
    @property
    def holding(self) -> bool:
        """Whether bytes read are held back unparsed (reading stays paused meanwhile)."""
        return bool(self._held)

    def data_received(self, data: bytes) -> None:
        if self._refused or self.transport.is_closing():
            return  # refused or closed: the rest is not worth parsing
        if self._held:
            # Reading was paused, but a read was already under way: keep it with the rest.
            self._held += data
            self.flow.pause_reading()
            if len(self._held) > _MAX_HELD_BYTES:
                self._close_from_here("%s pipelined over %d bytes ahead: connection closed",
                                      self._peer(), _MAX_HELD_BYTES)
            return
        self._feed(data)

    def _feed(self, data: bytes | bytearray) -> None:
        for start in range(0, len(data), _SLICE):
            if self.transport.is_closing():
                return
            if len(self.pipeline) >= self.limits.max_pipelined:
                self._held = bytearray(data[start:])
                self.flow.pause_reading()
                return
            self._parse(bytes(data[start:start + _SLICE]))

    def _parse(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # After parsing: a head still incomplete means all of these bytes are head bytes.
        if self._in_head and self._head_bytes > self.limits.max_header_bytes \
                and not self.transport.is_closing():
            logger.warning("request head over %d bytes: answered 431",
                           self.limits.max_header_bytes)
            self._answer_and_close(raw_431(self.limits.max_header_bytes))

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.state is not None:
            self.scope[CONNECTION_KEY] = self.state  # type: ignore[literal-required]
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.limits.header_timeout,
                                                    self._head_late)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._head_timer = _cancel(self._head_timer)
        self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_late)
        # A head that arrived whole in one read is measured as parsed. It is answered by a
        # stand-in app, so that uvicorn keeps the order of pipelined responses.
        size = len(self.url) + 16 + sum(len(name) + len(value) + 4
                                        for name, value in self.headers)
        if size <= self.limits.max_header_bytes:
            super().on_headers_complete()
            return
        logger.warning("request head over %d bytes: answered 431", self.limits.max_header_bytes)
        app, self.app = self.app, refusal_431(self.limits.max_header_bytes)
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_message_complete(self) -> None:
        self._body_timer = _cancel(self._body_timer)
        super().on_message_complete()
        self._in_head = True

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts the next pipelined request, resumes reading
        if self._held and not self.transport.is_closing() \
                and len(self.pipeline) < self.limits.max_pipelined:
            held, self._held = self._held, bytearray()
            self._feed(held)
            self.flow.resume_reading()  # unless some is held back again

    # --- deadlines --------------------------------------------------------------------
    def _head_late(self) -> None:
        self._head_timer = None
        if self._waiting_on_us():
            self._head_timer = self.loop.call_later(self.limits.header_timeout,
                                                    self._head_late)
            return
        self._time_out(f"no complete request head from {self._peer()} within "
                       f"{self.limits.header_timeout:g} s (header_timeout)")

    def _body_late(self) -> None:
        self._body_timer = None
        if self._waiting_on_us():
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_late)
            return
        self._time_out(f"request body from {self._peer()} incomplete after "
                       f"{self.limits.body_timeout:g} s (body_timeout)")

    def _waiting_on_us(self) -> bool:
        """Whether the server, not the client, is why bytes are not coming in: it stopped
        reading, or holds bytes back unparsed, or the request waits its turn."""
        return bool(self._held or self.pipeline) or (self.flow is not None
                                                     and self.flow.read_paused)

    def _handed_over(self) -> bool:
        """Closed, or upgraded (the transport belongs to another protocol now)."""
        return self.transport.is_closing() or self.transport.get_protocol() is not self

    def _time_out(self, why: str) -> None:
        if self._handed_over():
            return
        logger.warning("%s: connection closed", why)
        assert self.state is not None
        self.state.timed_out = True
        self._answer_and_close(raw_answer(408, "Request Timeout", why, "request_timeout"))

    # --- writing ----------------------------------------------------------------------
    def pause_writing(self) -> None:
        super().pause_writing()
        if self._write_timer is None:
            self._arm_write_timer()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_timer = _cancel(self._write_timer)

    def _arm_write_timer(self) -> None:
        self._unsent = unsent_bytes(self.transport)
        self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_stalled)

    def _write_stalled(self) -> None:
        self._write_timer = None
        if self._handed_over():
            return
        if unsent_bytes(self.transport) < self._unsent:
            self._arm_write_timer()  # it reads, however slowly
            return
        logger.warning("client at %s read nothing for %g s (write_timeout): connection "
                       "closed", self._peer(), self.limits.write_timeout)
        self._drop_requests()
        self.transport.abort()  # what is buffered for it goes, now

    # --- closing ----------------------------------------------------------------------
    def _answer_and_close(self, answer: bytes) -> None:
        """Close, with `answer` if no response is half-way out (it would corrupt that)."""
        running = self._running
        if running is None or not running.response_started or running.response_complete:
            self.transport.write(answer)
        self._drop_requests()
        _close(self.transport)

    def _close_from_here(self, message: str, *args: object) -> None:
        logger.warning(message, *args)
        self._drop_requests()
        self.transport.abort()

    def _drop_requests(self) -> bool:
        """Every request of this connection is gone: their apps see a disconnect, writes
        are skipped, the queued ones are forgotten (they hold their bodies). Whether any
        request was still unanswered."""
        if self.state is not None and not self.state.lost:
            self.state.cut = True  # closed from here, or about to be
        cycles = [cycle for cycle, _ in self.pipeline]
        self.pipeline.clear()
        self._held = bytearray()
        unanswered = False
        for cycle in (self._running, self.cycle, *cycles):
            if cycle is not None and not cycle.response_complete and not cycle.disconnected:
                unanswered = True
                cycle.disconnected = True
                cycle.message_event.set()
        if self.flow is not None:
            self.flow.resume_writing()  # a send waiting for the reader returns (and drops)
        return unanswered

    def _peer(self) -> str:
        return f"{self.client[0]}:{self.client[1]}" if self.client else "unknown"


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _close(transport: asyncio.Transport) -> None:
    """Close after the last answer is flushed, but give a client that reads nothing only
    `_CLOSE_GRACE` seconds (close() alone would wait for it forever)."""
    transport.close()
    asyncio.get_running_loop().call_later(_CLOSE_GRACE, transport.abort)
