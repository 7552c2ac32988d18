"""A log line that cannot flood: the first occurrence is logged at once, the rest of the
interval only counted, and one line at the interval's end says how many were suppressed.

An attacker who opens 10,000 connections a second, or a kernel out of file descriptors,
costs one line per interval, not one per event (the metric counts every one).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
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


class ThrottleFilter(logging.Filter):
    """Lets a logger's records through at most once per ``interval`` for each message
    (format string and level): aiohttp logs "Error handling request" with a traceback for
    every malformed request, and an attacker chooses how many of those there are. A record
    let through carries ``suppressed``: how many like it were dropped since the last one;
    ``close()`` logs what is still counted. Dropped records are never formatted."""

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._last: dict[tuple[int, str], float] = {}
        self._dropped: dict[tuple[int, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.levelno, str(record.msg))
        now = time.monotonic()
        if now - self._last.get(key, -math.inf) < self._interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        if len(self._last) >= _MAX_MESSAGES and key not in self._last:
            self._last.clear()  # bounded: so many distinct messages are a flood themselves
        self._last[key] = now
        record.suppressed = self._dropped.pop(key, 0)
        return True

    def close(self, logger: logging.Logger) -> None:
        """Log one line per message still counted, on ``logger`` (not the filtered one)."""
        for (level, msg), count in self._dropped.items():
            event(
                logger,
                "internal http server errors suppressed",
                level,
                error=msg,
                suppressed=count,
            )
        self._dropped.clear()


_MAX_MESSAGES = 256


def throttled_logger(name: str, interval: float) -> tuple[logging.Logger, ThrottleFilter]:
    """The logger ``name`` with a ``ThrottleFilter`` of ``interval`` (one filter, however
    often the listener starts)."""
    logger = logging.getLogger(name)
    for old in [f for f in logger.filters if isinstance(f, ThrottleFilter)]:
        logger.removeFilter(old)
    throttle = ThrottleFilter(interval)
    logger.addFilter(throttle)
    return logger, throttle
