"""The API's connections: a cap, idle and header-read timeouts, and quiet accept errors.

aiohttp keeps a connection open for as long as the client does when the client never sends
a request (before aiohttp 3.14), takes no cap on connections, and the event loop logs a
traceback for every failed accept. 1100 idle connections therefore exhausted the agent's
open files, the API answered nothing, and the log grew by megabytes a second.

``ConnectionGuard`` wraps aiohttp's protocol factory (``loop.create_server(guard.protocol,
...)``) and keeps, per connection, when it last sent a byte, whether a request is in
progress (the ``middleware`` marks it) and when its current request began:

- idle (no request in progress, nothing received) for ``idle_timeout``: closed;
- a request's headers not complete ``header_timeout`` after its first byte: closed;
- at ``max_connections`` a new connection closes the one idle the longest, as nginx reuses
  its idle keep-alive connections when it runs out; when none is idle the new one is closed.

``AcceptErrorLog`` logs "out of open files" accept errors once per burst with a count.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from pleaco import logs
from pleaco.api.config import ApiConfig

log = logs.get("pleaco.api.connections")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# What asyncio's selector loop reports (loop.call_exception_handler) when accept() fails
# with EMFILE, ENFILE, ENOBUFS or ENOMEM; it then pauses accepting for a second and retries.
ACCEPT_FAILED = "socket.accept() out of system resource"


def connection_cap(cfg: ApiConfig) -> int:
    """``max_connections``, lowered to what the open-file limit leaves after ``reserved_fds``
    (a cap above it would hit EMFILE first), and at least 1."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return cfg.max_connections
    return max(1, min(cfg.max_connections, soft - cfg.reserved_fds))


@dataclass
class _Conn:
    transport: asyncio.Transport
    last_seen: float  # monotonic time of the last byte received or response finished
    request_started: float | None = None  # first byte of a request whose handler has not begun
    in_flight: int = 0


class _GuardedProtocol(asyncio.Protocol):
    """Forwards everything to aiohttp's protocol, telling the guard what it sees."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.conn: _Conn | None = None  # None: refused at the cap

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.conn = self.guard.admit(transport)
        if self.conn is not None:
            self.inner.connection_made(transport)
        else:
            transport.abort()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is not None:
            conn.last_seen = time.monotonic()
            if conn.in_flight == 0 and conn.request_started is None:
                conn.request_started = conn.last_seen
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.guard.forget(self.conn)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class ConnectionGuard:
    def __init__(self, cfg: ApiConfig) -> None:
        self.cfg = cfg
        self.cap = connection_cap(cfg)
        self._factory: Callable[[], asyncio.Protocol] | None = None
        self._conns: dict[asyncio.BaseTransport, _Conn] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self.closed: dict[str, int] = {"idle": 0, "slow_headers": 0, "evicted": 0, "refused": 0}

    def __len__(self) -> int:
        return len(self._conns)

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for ``loop.create_server``."""
        assert self._factory is not None, "start() first"
        return _GuardedProtocol(self, self._factory())

    def start(self, factory: Callable[[], asyncio.Protocol]) -> None:
        """Guard the connections of ``factory``'s protocols (aiohttp's ``runner.server``)."""
        self._factory = factory
        if self.cap < self.cfg.max_connections:
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.warning("api.connection_cap_lowered", max_connections=self.cfg.max_connections, cap=self.cap,
                        open_files_limit=soft, reserved_fds=self.cfg.reserved_fds)
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="api-connections")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    # -- the protocol's and the middleware's reports --------------------------------------

    def admit(self, transport: asyncio.Transport) -> _Conn | None:
        if len(self._conns) >= self.cap:
            idle = [c for c in self._conns.values() if c.in_flight == 0]
            if not idle:
                self.closed["refused"] += 1
                log.warning("api.connection_refused", reason="every connection has a request in progress",
                            cap=self.cap)
                return None
            self._close(min(idle, key=lambda c: c.last_seen), "evicted")
        conn = _Conn(transport, time.monotonic())
        self._conns[transport] = conn
        return conn

    def forget(self, conn: _Conn) -> None:
        if self._conns.get(conn.transport) is conn:
            del self._conns[conn.transport]

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Marks the request's connection busy while its handler runs (never idle-closed)."""
        conn = self._conns.get(request.transport) if request.transport is not None else None
        if conn is None:
            return await handler(request)
        conn.in_flight += 1
        conn.request_started = None
        try:
            return await handler(request)
        finally:
            conn.in_flight -= 1
            conn.last_seen = time.monotonic()

    # -- timeouts --------------------------------------------------------------------------

    def _close(self, conn: _Conn, why: str) -> None:
        self.forget(conn)
        self.closed[why] += 1
        conn.transport.close()

    def sweep(self, now: float) -> None:
        """Close the connections past their idle or header-read timeout."""
        for conn in list(self._conns.values()):
            if conn.in_flight:
                continue
            if conn.request_started is not None:
                if now - conn.request_started > self.cfg.header_timeout:
                    self._close(conn, "slow_headers")
            elif now - conn.last_seen > self.cfg.idle_timeout:
                self._close(conn, "idle")

    async def _sweep_forever(self) -> None:
        # A quarter of the shorter timeout: a connection outlives its timeout by at most that.
        interval = min(self.cfg.idle_timeout, self.cfg.header_timeout) / 4
        reported = dict(self.closed)
        while True:
            await asyncio.sleep(interval)
            self.sweep(time.monotonic())
            if self.closed != reported:
                changes = {k: v - reported[k] for k, v in self.closed.items() if v != reported[k]}
                log.info("api.connections_closed", open=len(self._conns), cap=self.cap, **changes)
                reported = dict(self.closed)


class AcceptErrorLog:
    """An event loop exception handler that logs failed accepts (out of open files) once
    per burst, with a count (``logs.Burst``), instead of a traceback per attempt; everything
    else goes to the handler it replaces. asyncio retries a failed accept every second."""

    def __init__(self, window: float = 10.0) -> None:
        self._burst = logs.Burst(log, "api.accept_failed", window, level="error")
        self._previous: Any = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop.get_exception_handler() is self:
            loop.set_exception_handler(self._previous)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != ACCEPT_FAILED:
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._burst.log(error=str(context.get("exception")), open_files_limit=soft)
