"""What the store returns for the operator console's reads: the stats time series, the
pinned message bytes, the malformed records found by delivery id."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

Window = Literal["1h", "24h"]

# Per window: the interval width in seconds and how many intervals make the window.
WINDOWS: dict[str, tuple[int, int]] = {"1h": (60, 60), "24h": (900, 96)}


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """Counts for one interval starting at ``start`` (``interval_seconds`` wide)."""

    start: datetime
    sent: int  # deliveries that ended sent
    failed: int  # deliveries that ended failed (permanent refusal, render fault)
    dead_lettered: int  # deliveries that went to the dead letters
    malformed: int  # stream entries refused at intake


@dataclass(frozen=True, slots=True)
class SeriesTotals:
    sent: int
    failed: int
    dead_lettered: int
    malformed: int


@dataclass(frozen=True, slots=True)
class StatsSeries:
    window: Window
    interval_seconds: int
    points: list[SeriesPoint]  # oldest first; the last interval holds now
    totals: SeriesTotals


@dataclass(frozen=True, slots=True)
class PinnedMessage:
    """A delivery's rendered bytes as pinned at its first claim (None: not rendered yet)."""

    delivery_id: str
    status: str
    rendered_at: datetime | None
    data: bytes | None
