"""The listener's request rate, bounded so a flood cannot take the pipeline's CPU.

Every request costs the daemon's one event loop some CPU whatever it asks for (parsing,
routing, a response). A token bucket of ``MAIL_INTERNAL_HTTP_REQUEST_RATE`` per second
(bursts of ``MAIL_INTERNAL_HTTP_REQUEST_BURST``) for the whole listener, and one of half
that for each client address, pace requests before any other middleware runs:

- a request over the rate *waits* for its token (backpressure): a client sending back to
  back is slowed to the rate, and costs the daemon only rate times the per-request cost;
- one that would wait longer than ``MAIL_INTERNAL_HTTP_REQUEST_MAX_WAIT`` waits that long
  and is answered ``503`` with ``Retry-After`` (so a refusal is not a fast loop either);
- a request carrying a valid operator or read token is not paced, so an operator can
  still act during a flood.

Tokens are reserved ahead (a bucket goes below zero, down to rate times max wait): waiting
requests are served in arrival order, each sleeps once per bucket. The per-address buckets
(at most ``MAX_PEERS``, least recently seen dropped first) keep one flooding address to
half the rate, so a prober on another address still gets through at once. The number of
waiting requests is bounded by ``MAIL_INTERNAL_HTTP_MAX_CONNECTIONS``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from maildaemon.config import Settings
from maildaemon.http.respond import Handler, error_response
from maildaemon.http.throttle import ThrottledEvent

log = logging.getLogger("maildaemon.http")

MAX_PEERS = 1024


class TokenBucket:
    """``rate`` tokens a second up to ``capacity``; a reservation may run into debt."""

    __slots__ = ("_capacity", "_rate", "_stamp", "_tokens")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self._rate = rate
        self._capacity = capacity
        self._tokens = capacity
        self._stamp = now

    def reserve(self, now: float, max_wait: float) -> float | None:
        """Take a token: the seconds until it is there (0: at once), or ``None`` (nothing
        taken) when that is longer than ``max_wait``."""
        tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        wait = (1.0 - tokens) / self._rate if tokens < 1.0 else 0.0
        if wait > max_wait:
            self._tokens = tokens
            return None
        self._tokens = tokens - 1.0
        return wait


@dataclass(frozen=True, slots=True)
class Paced:
    """A request that had to wait: on which bucket, whether it was refused in the end."""

    limit: str  # "peer" or "listener"
    refused: bool
    waited: float


class RequestPacer:
    """The listener's bucket and one per client address (an LRU of ``max_peers``)."""

    def __init__(
        self, rate: float, burst: int, max_wait: float, max_peers: int = MAX_PEERS
    ) -> None:
        self.rate = rate
        self.max_wait = max_wait
        self._peer_rate = rate / 2
        self._peer_burst = max(1.0, burst / 2)
        self._max_peers = max_peers
        self._listener = TokenBucket(rate, float(burst), time.monotonic())
        self._peers: OrderedDict[str, TokenBucket] = OrderedDict()

    def _peer(self, remote: str, now: float) -> TokenBucket:
        bucket = self._peers.get(remote)
        if bucket is None:
            bucket = TokenBucket(self._peer_rate, self._peer_burst, now)
            self._peers[remote] = bucket
            if len(self._peers) > self._max_peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(remote)
        return bucket

    async def admit(self, remote: str | None) -> Paced | None:
        """Wait for this request's tokens: ``None`` when it had them at once, else how it
        was paced (``refused`` once it waited ``max_wait``, the bucket it waited on)."""
        started = time.monotonic()
        peer_wait = self._peer(remote or "", started).reserve(started, self.max_wait)
        if peer_wait is None:
            await asyncio.sleep(self.max_wait)
            return Paced("peer", refused=True, waited=self.max_wait)
        if peer_wait > 0:
            await asyncio.sleep(peer_wait)
        now = time.monotonic()
        left = max(0.0, self.max_wait - (now - started))
        wait = self._listener.reserve(now, left)
        if wait is None:
            await asyncio.sleep(left)
            return Paced("listener", refused=True, waited=time.monotonic() - started)
        if wait > 0:
            await asyncio.sleep(wait)
        elif peer_wait == 0:
            return None
        limit = "listener" if wait > 0 else "peer"
        return Paced(limit, refused=False, waited=time.monotonic() - started)

    @property
    def addresses(self) -> tuple[str, ...]:
        """The client addresses with a bucket, least recently seen first."""
        return tuple(self._peers)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.max_wait))


def _bearer_tokens(settings: Settings) -> tuple[bytes, ...]:
    tokens = list(settings.operator_identities())
    if settings.read_token is not None:
        tokens.append(settings.read_token)
    return tuple(t.encode() for t in tokens)


def _carries_token(request: web.Request, tokens: tuple[bytes, ...]) -> bool:
    """A valid operator or read token in ``Authorization`` (every one compared, in
    constant time); nothing is parsed for a request without the header."""
    header = request.headers.get("Authorization")
    if not header or not tokens:
        return False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        return False
    raw = given.strip().encode("utf-8", "surrogateescape")
    found = False
    for token in tokens:
        found |= hmac.compare_digest(raw, token)
    return found


def request_pacing(
    settings: Settings, on_pacing: Callable[[str, str], None]
) -> tuple[Middleware, ThrottledEvent]:
    """The pacing middleware and its throttled refusal log (to close with the listener);
    ``on_pacing(outcome, limit)`` counts each request ``delayed`` or ``refused`` by a
    ``peer`` or the ``listener`` bucket."""
    pacer = RequestPacer(
        settings.internal_http_request_rate,
        settings.internal_http_request_burst,
        settings.internal_http_request_max_wait,
    )
    tokens = _bearer_tokens(settings)
    refusals = ThrottledEvent(
        log, "internal http request refused", settings.internal_http_log_interval
    )

    @web.middleware
    async def pace(request: web.Request, handler: Handler) -> web.StreamResponse:
        if _carries_token(request, tokens):
            return await handler(request)
        remote = request.remote
        paced = await pacer.admit(remote)
        if paced is None:
            return await handler(request)
        if not paced.refused:
            on_pacing("delayed", paced.limit)
            return await handler(request)
        on_pacing("refused", paced.limit)
        refusals(limit=paced.limit, remote=remote, rate=pacer.rate, waited_s=round(paced.waited, 3))
        return error_response(
            503,
            "over_rate",
            "the listener is answering more requests than MAIL_INTERNAL_HTTP_REQUEST_RATE; "
            "try again later",
            headers={"Retry-After": str(pacer.retry_after())},
        )

    return pace, refusals
