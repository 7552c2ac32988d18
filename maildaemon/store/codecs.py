"""How values cross from PostgreSQL into Python when the driver's own reading would fail.

PostgreSQL's ``timestamptz`` runs from 4713 BC to 294276 AD; Python's ``datetime`` from
year 1 to 9999. A row holding an instant outside Python's range (written by an older
release, by hand, or by arithmetic in SQL) made the driver raise ``OverflowError`` for the
whole result — the scheduler's claim, a delivery's lookup — every time the row was read.
Each connection of the store's pools reads ``timestamptz`` through this codec instead:
an instant past either end of Python's range reads as that end (``infinity`` as well),
so one row can no longer make a statement unreadable.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_FIRST = datetime.min.replace(tzinfo=UTC)
_LAST = datetime.max.replace(tzinfo=UTC)
_FIRST_US = (_FIRST - _PG_EPOCH) // _ONE_US
_LAST_US = (_LAST - _PG_EPOCH) // _ONE_US
_PG_INFINITY = 2**63 - 1
_PG_MINUS_INFINITY = -(2**63)


def decode_instant(value: tuple[int]) -> datetime:
    """PostgreSQL's microseconds since 2000-01-01 UTC, clamped to Python's range."""
    micros = value[0]
    if micros <= _FIRST_US:
        return _FIRST
    if micros >= _LAST_US:
        return _LAST
    return _PG_EPOCH + timedelta(microseconds=micros)


def encode_instant(value: datetime) -> tuple[int]:
    """A datetime for a ``timestamptz`` parameter (naive means UTC, as the driver reads it;
    ``datetime.max``/``min`` stand for infinity, as the driver writes them)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    if value == _LAST:
        return (_PG_INFINITY,)
    if value == _FIRST:
        return (_PG_MINUS_INFINITY,)
    return ((value - _PG_EPOCH) // _ONE_US,)


async def install(conn: Any) -> None:
    """The pool's ``init``: read ``timestamptz`` through the clamping codec."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=encode_instant,
        decoder=decode_instant,
        format="tuple",
    )
