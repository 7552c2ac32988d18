"""A log line that cannot flood: the first occurrence is logged at once, the rest of the
interval only counted, and one line at the interval's end says how many were suppressed.

An attacker who opens 10,000 connections a second, or a kernel out of file descriptors,
costs one line per interval, not one per event (the metric counts every one).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from maildaemon.logs import event


class ThrottledEvent:
    """One log event (a stable name) at most once per ``interval`` seconds."""

    def __init__(
        self, log: logging.Logger, name: str, interval: float, level: int = logging.WARNING
    ) -> None:
        self._log = log
        self.name = name
        self._interval = interval
        self._level = level
        self._suppressed = 0
        self._last: dict[str, Any] = {}
        self._window: asyncio.TimerHandle | None = None

    def __call__(self, **fields: Any) -> None:
        """Log this occurrence, or count it when a line went out in this interval."""
        if self._window is not None:
            self._suppressed += 1
            self._last = fields
            return
        event(self._log, self.name, self._level, suppressed=0, **fields)
        self._open_window()

    def _open_window(self) -> None:
        loop = asyncio.get_running_loop()
        self._window = loop.call_later(self._interval, self._close_window)

    def _close_window(self) -> None:
        self._window = None
        if self._suppressed:
            # The interval's summary: the last occurrence's fields and how many were not
            # logged; it opens the next interval, so a steady flood is one line each.
            count, self._suppressed = self._suppressed, 0
            event(self._log, self.name, self._level, suppressed=count, **self._last)
            self._open_window()

    def close(self) -> None:
        """Log what is still counted (at shutdown) and stop the timer."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        if self._suppressed:
            count, self._suppressed = self._suppressed, 0
            event(self._log, self.name, self._level, suppressed=count, **self._last)
