"""Optional send-rate limits: global and per recipient domain, with back-off on "slow down".

Off by default (rates of 0). A 421/450/451 reply that mentions rate or too many messages
makes that domain wait ``MAIL_DOMAIN_BACKOFF`` before the next send to it.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable

from maildaemon.addresses import domain_key
from maildaemon.sending.reply import Reply, SendReport

_SLOW_DOWN_CODES = frozenset({421, 450, 451})
_SLOW_DOWN_TEXT = re.compile(r"rate|too many|slow down|throttl|try again later", re.I)


class TokenBucket:
    """``rate`` tokens per second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.capacity = burst if burst is not None else max(1.0, rate)
        self._tokens = self.capacity
        self._stamp = time.monotonic()

    def delay(self) -> float:
        """Take a token; return how long to wait before using it."""
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        self._tokens -= 1.0
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class RateLimiter:
    def __init__(self, global_rate: float, domain_rate: float, backoff: float) -> None:
        self._global = TokenBucket(global_rate) if global_rate > 0 else None
        self._domain_rate = domain_rate
        self._domains: dict[str, TokenBucket] = {}
        self._backoff = backoff
        self._blocked_until: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self._global is not None or self._domain_rate > 0

    async def acquire(self, recipients: Iterable[str]) -> None:
        if not self.enabled:
            return
        wait = self._global.delay() if self._global is not None else 0.0
        now = time.monotonic()
        for domain in {domain_key(r.rpartition("@")[2]) for r in recipients}:
            wait = max(wait, self._blocked_until.get(domain, now) - now)
            if self._domain_rate > 0:
                bucket = self._domains.get(domain)
                if bucket is None:
                    bucket = self._domains[domain] = TokenBucket(self._domain_rate)
                wait = max(wait, bucket.delay())
        if wait > 0:
            await asyncio.sleep(wait)

    def observe(self, report: SendReport) -> None:
        """Back a domain off when its server asks us to slow down (only with limits on)."""
        if not self.enabled:
            return
        replies: list[tuple[str, Reply]] = list(report.deferred.items())
        if report.data_refused is not None:
            replies.extend((r, report.data_refused) for r in report.accepted)
        until = time.monotonic() + self._backoff
        for rcpt, reply in replies:
            if reply.code in _SLOW_DOWN_CODES and _SLOW_DOWN_TEXT.search(reply.text):
                self._blocked_until[domain_key(rcpt.rpartition("@")[2])] = until
