"""Retrying: the delivery retry ladder, and the one backoff every dependency loop uses.

``RetryPolicy`` decides when a delivery is tried again after a transient failure (the ladder
``MAIL_RETRY_LADDER`` with ``MAIL_RETRY_JITTER``). ``Backoff`` paces a loop that retries an
outside dependency (PostgreSQL, Redis) after it failed: one policy everywhere —
first wait 0.1 s, doubled after each failure up to 10 s, each wait spread by ±20 % so that
replicas that lost the same dependency do not come back in lockstep; reset on success.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta

BACKOFF_FIRST = 0.1  # seconds
BACKOFF_CAP = 10.0  # seconds
BACKOFF_JITTER = 0.2  # ± fraction of each wait


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    ladder: tuple[float, ...]
    jitter: float
    unknown_policy: str = "retry"  # or "hold"

    def next_attempt(
        self, attempt_no: int, now: datetime, rng: random.Random | None = None
    ) -> datetime | None:
        """When to try again after transient failure number ``attempt_no``; None: give up."""
        if attempt_no > len(self.ladder):
            return None
        base = self.ladder[attempt_no - 1]
        spread = base * self.jitter
        delay = base + (rng or random).uniform(-spread, spread)
        return now + timedelta(seconds=max(delay, 0.0))

    def gives_up_at(self, attempt_count: int, last: datetime) -> datetime:
        """When the ladder would be exhausted if every remaining attempt failed."""
        remaining = self.ladder[attempt_count:] if attempt_count < len(self.ladder) else ()
        return last + timedelta(seconds=sum(remaining))


class Backoff:
    """Exponential backoff for a loop retrying an outside dependency (see the module doc)."""

    def __init__(
        self,
        first: float = BACKOFF_FIRST,
        cap: float = BACKOFF_CAP,
        jitter: float = BACKOFF_JITTER,
        rng: random.Random | None = None,
    ) -> None:
        self._first, self._cap, self._jitter = first, cap, jitter
        self._rng = rng or random.Random()
        self._current = first

    def peek(self) -> float:
        """The base of the next wait (what a log line announces)."""
        return self._current

    def next(self) -> float:
        """The next wait in seconds; the one after it is doubled, up to the cap."""
        base = self._current
        self._current = min(self._current * 2, self._cap)
        return max(0.0, base * (1 + self._rng.uniform(-self._jitter, self._jitter)))

    def reset(self) -> None:
        self._current = self._first
