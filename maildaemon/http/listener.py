"""The listener's socket under abuse: a cap on open connections, a deadline for the first
request head, accept errors (out of file descriptors) counted and logged throttled.

``GuardedSite`` is aiohttp's TCP site with its protocol factory wrapped:

- beyond ``MAIL_INTERNAL_HTTP_MAX_CONNECTIONS`` open connections a new one is answered
  ``503`` and closed at once (``internal http connection refused``), so idle or slow
  clients cannot take every file descriptor of the process;
- a connection that has not sent a complete request head within
  ``MAIL_INTERNAL_HTTP_HEADER_TIMEOUT`` of opening is answered ``408`` and closed
  (``internal http request timed out``, phase ``header``). Later requests on a kept-alive
  connection are bounded by aiohttp's keep-alive timeout, set to the same value.

The head is found by its blank line; nothing else of the request is parsed here.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web

from maildaemon.config import Settings
from maildaemon.http.throttle import ThrottledEvent, throttled_logger

log = logging.getLogger("maildaemon.http")

_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 21\r\nRetry-After: 1\r\nConnection: close\r\n\r\n"
    b"too many connections\n"
)
_TIMED_OUT = (
    b"HTTP/1.1 408 Request Timeout\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 16\r\nConnection: close\r\n\r\nrequest too slow\n"
)
# A request head: its request line and each header line at most, and how many headers.
MAX_LINE_BYTES = 8190
MAX_HEADERS = 64
_ExceptionHandler = Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object]
# What a kernel out of resources answers accept() with.
ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def _ignore(_: str) -> None:
    return None


@dataclass(frozen=True)
class ListenerSignals:
    """What the listener reports to the metrics (``http`` imports no telemetry)."""

    refused: Callable[[], None] = lambda: None
    accept_error: Callable[[str], None] = _ignore  # by errno name
    timed_out: Callable[[str], None] = _ignore  # by phase: header, body
    open_connections: Callable[[int], None] = lambda _: None


class ConnectionGuard:
    """Counts open connections, refuses those beyond the cap, times out slow heads."""

    def __init__(
        self,
        max_connections: int,
        header_timeout: float,
        log_interval: float,
        signals: ListenerSignals,
    ) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.signals = signals
        self.open = 0
        self.refusals = ThrottledEvent(log, "internal http connection refused", log_interval)
        self.timeouts = ThrottledEvent(log, "internal http request timed out", log_interval)
        self.accept_errors = ThrottledEvent(
            log, "internal http accept failed", log_interval, logging.ERROR
        )

    @classmethod
    def for_settings(cls, settings: Settings, signals: ListenerSignals) -> ConnectionGuard:
        return cls(
            settings.internal_http_max_connections,
            settings.internal_http_header_timeout,
            settings.internal_http_log_interval,
            signals,
        )

    def factory(self, server: web.Server) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if self.open >= self.max_connections:
                return _Refused(self)
            return _Watched(self, server())

        return make

    def opened(self) -> None:
        self.open += 1
        self.signals.open_connections(self.open)

    def closed(self) -> None:
        self.open -= 1
        self.signals.open_connections(self.open)

    def refused(self, peer: object) -> None:
        self.signals.refused()
        self.refusals(open=self.open, limit=self.max_connections, remote=_host(peer))

    def timed_out(self, phase: str, remote: str | None, timeout: float) -> None:
        self.signals.timed_out(phase)
        self.timeouts(phase=phase, remote=remote, timeout_s=timeout)

    def accept_failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "unknown")
        self.signals.accept_error(name)
        self.accept_errors(error=name, message=str(exc), open=self.open)

    def close(self) -> None:
        for throttled in (self.refusals, self.timeouts, self.accept_errors):
            throttled.close()


def _host(peer: object) -> str | None:
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None


class _Refused(asyncio.Protocol):
    """A connection beyond the cap: answered 503 and closed before anything is read."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._guard.refused(transport.get_extra_info("peername"))
        # Not isinstance: uvloop's transports are not asyncio.Transport subclasses.
        stream = cast(asyncio.Transport, transport)
        stream.write(_REFUSED)
        stream.close()

    def data_received(self, data: bytes) -> None:
        return None


class _Watched(asyncio.Protocol):
    """aiohttp's request handler, counted, with a deadline on its first request head."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, to find a blank line split across reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's: no subclass
        self._guard.opened()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self._guard.header_timeout, self._expire)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._deadline is not None:
            seen = self._tail + data
            if b"\n\r\n" in seen or b"\n\n" in seen:
                self._deadline.cancel()
                self._deadline = None
                self._tail = b""
            else:
                self._tail = seen[-2:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._guard.closed()
        self._inner.connection_lost(exc)

    def _expire(self) -> None:
        self._deadline = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        peer = _host(transport.get_extra_info("peername"))
        self._guard.timed_out("header", peer, self._guard.header_timeout)
        transport.write(_TIMED_OUT)
        transport.close()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections pass a ``ConnectionGuard``."""

    __slots__ = ("_guard", "_host", "_port", "_previous_handler")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard
    ) -> None:
        super().__init__(runner, backlog=min(1024, max(128, guard.max_connections)))
        self._host = host
        self._port = port
        self._guard = guard
        self._previous_handler: _ExceptionHandler | None = None

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None
        self._server = await loop.create_server(
            self._guard.factory(server),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=True,
        )
        self._previous_handler = loop.get_exception_handler()
        loop.set_exception_handler(accept_errors_to(self._guard, loop))

    async def stop(self) -> None:
        await super().stop()
        asyncio.get_running_loop().set_exception_handler(self._previous_handler)
        self._guard.close()


async def serve(app: web.Application, settings: Settings, guard: ConnectionGuard) -> web.AppRunner:
    """Run ``app`` on MAIL_INTERNAL_HTTP_ADDR behind ``guard``, with aiohttp's own bounds on
    a request head (line, field and header count) and on a kept-alive connection's idle
    time; ``runner.cleanup()`` stops it."""
    # aiohttp's own error lines (one with a traceback per malformed request) are throttled.
    server_log, throttle = throttled_logger(
        "maildaemon.http.server", settings.internal_http_log_interval
    )

    async def flush(_: web.Application) -> None:
        throttle.close(log)

    app.on_cleanup.append(flush)
    runner = web.AppRunner(
        app,
        logger=server_log,
        access_log=None,
        handle_signals=False,
        shutdown_timeout=1.0,
        # Later requests on a kept-alive connection get the first one's head deadline
        # (aiohttp closes a connection idle or mid-head this long after a response).
        keepalive_timeout=settings.internal_http_header_timeout,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES,
        max_headers=MAX_HEADERS,
        lingering_time=1.0,  # a body nobody reads is drained this long, not 10 s
    )
    await runner.setup()
    host, port = settings.http_host_port
    await GuardedSite(runner, host, port, guard).start()
    return runner


def accept_errors_to(guard: ConnectionGuard, loop: asyncio.AbstractEventLoop) -> _ExceptionHandler:
    """A loop exception handler: accept() out of resources (EMFILE and the like) is counted
    and logged throttled by ``guard``; anything else goes to the handler set before."""
    previous = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        message = str(context.get("message", ""))
        if (
            isinstance(exc, OSError)
            and exc.errno in ACCEPT_ERRNOS
            and ("accept" in message or "listen" in message or not message)
        ):
            guard.accept_failed(exc)
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    return handle
