"""Whether the SMTP destination can be reached at all.

A failure to open a session — TCP connect, banner, EHLO or STARTTLS (refused, reset, TLS
down, timed out) — says nothing about the message: it is the destination that is down.
The first such failure marks it down; from then on nothing is claimed and no delivery is
charged an attempt, until a probe opens a session again (``pipeline.probe``).
"""

from __future__ import annotations

import asyncio
import time

from maildaemon.errors import TransportError

# Stages of opening a session whose failure means the destination is unreachable. AUTH is
# not one: a server that refuses our credentials is up (the attempts record the refusal).
SESSION_STAGES = frozenset({"connect", "ehlo", "starttls"})


def is_unreachable(exc: TransportError) -> bool:
    """The exchange failed before a session was open: the destination, not the message."""
    return exc.stage in SESSION_STAGES


class Destination:
    """Up/down state of the SMTP destination, shared by the workers, scheduler and probe."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.last_error: TransportError | None = None
        self._down_since: float | None = None
        self._up = asyncio.Event()
        self._up.set()
        self._down = asyncio.Event()

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def mark_down(self, exc: TransportError) -> bool:
        """Record a failure to reach it; True when this turned it from up to down."""
        self.last_error = exc
        if not self.up:
            return False
        self._down_since = time.monotonic()
        self._up.clear()
        self._down.set()
        return True

    def mark_up(self) -> float:
        """It answered again; returns how long it was down (seconds)."""
        down_for = time.monotonic() - (self._down_since or time.monotonic())
        self._down_since = None
        self._down.clear()
        self._up.set()
        return down_for

    async def wait_down(self) -> None:
        await self._down.wait()

    async def wait_up(self, unless: asyncio.Event) -> None:
        """Wait until it is up again, or ``unless`` is set (a stop)."""
        if self.up or unless.is_set():
            return
        waiters = {
            asyncio.ensure_future(self._up.wait()),
            asyncio.ensure_future(unless.wait()),
        }
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    def describe(self) -> str:
        """``ok``, or since when and why it is down (for /readyz)."""
        if self.up:
            return "ok"
        since = time.monotonic() - (self._down_since or time.monotonic())
        exc = self.last_error
        reply = f" ({exc.code} {exc.text})" if exc is not None and exc.code else ""
        return f"down for {since:.1f}s: {exc}{reply}" if exc else f"down for {since:.1f}s"
