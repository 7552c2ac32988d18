"""Template previews cost CPU: they are rendered off the event loop, a few at a time, and
at most ``MAIL_INTERNAL_HTTP_PREVIEW_RATE`` per second (bursts of
``MAIL_INTERNAL_HTTP_PREVIEW_BURST``) for the whole listener; beyond, 429 with Retry-After.

One bucket for every client: twenty clients cannot take twenty times the rate, so the
deliveries sharing the process keep their CPU whoever asks.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PreviewGate:
    def __init__(self, rate: float, burst: int, concurrency: int = 2) -> None:
        self._rate = rate
        self._capacity = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._running = asyncio.Semaphore(concurrency)

    def admit(self) -> int | None:
        """Take a token: ``None`` when admitted, else the seconds until one is there."""
        now = time.monotonic()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return None
        return max(1, math.ceil((1.0 - self._tokens) / self._rate))

    async def render(self, work: Callable[[], T]) -> T:
        """Run ``work`` in a thread, at most ``concurrency`` at once."""
        async with self._running:
            return await asyncio.to_thread(work)
