"""Accepted means storable and readable: every command intake accepts round-trips
PostgreSQL → asyncpg → Python through ingest, the scheduler's claim and the operator's
lookup — instants at every edge of the accepted range (and every offset), numbers at every
edge of JSON's, and text of every kind (property test against a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from maildaemon.contract import limits
from maildaemon.contract.command import DeliveryCommand
from maildaemon.contract.parsing import parse_command
from maildaemon.delivery import IntakeEntry
from maildaemon.operator.model import delivery_detail
from maildaemon.operator.views import dump
from maildaemon.retry import RetryPolicy
from maildaemon.store.operator.reads import OperatorReads
from maildaemon.store.pipeline.db import Store
from tests import strategies

EDGES = [
    limits.INSTANT_MIN,
    limits.INSTANT_MAX,
    datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    datetime(1, 1, 1, tzinfo=UTC),
    datetime(2038, 1, 19, 3, 14, 8, tzinfo=UTC),
]


@st.composite
def instant(draw: st.DrawFn) -> str:
    """An RFC 3339 instant near the range's edges or anywhere, with any offset."""
    base = draw(
        st.one_of(
            st.sampled_from(EDGES),
            st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)).map(
                lambda d: d.replace(tzinfo=UTC)
            ),
        )
    )
    minutes = draw(st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1))
    hours, rest = divmod(abs(minutes), 60)
    sign = "+" if minutes >= 0 else "-"
    # The same wall clock read in another offset: past either end once turned into UTC.
    return base.replace(tzinfo=None).isoformat() + f"{sign}{hours:02d}:{rest:02d}"


NUMBERS = st.one_of(
    st.integers(min_value=-(10**300), max_value=10**300),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, -0.0, 2**63, -(2**63) - 1, 10**4000]),
)
VALUES: st.SearchStrategy[Any] = st.recursive(
    st.one_of(NUMBERS, st.text(max_size=30), st.booleans(), st.none()),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def accepted_or_not(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    """A command (valid or not) and a raw JSON number to append to it (or nothing)."""
    doc = draw(strategies.command("placeholder"))
    for name in ("send_at", "expires_at"):
        if draw(st.booleans()):
            doc[name] = draw(instant())
    if doc["payload_mode"] == "template":
        doc["variables"]["extra"] = draw(VALUES)
    tail = draw(st.sampled_from(["", "", "1e400", "-1e400", "1e-400", "123456789e-3"]))
    return doc, tail


def _text(doc: dict[str, Any], tail: str) -> str:
    """The command as a producer writes it: numbers as JSON has them, not as Python would."""
    ident = f"rt-{uuid.uuid4().hex[:12]}"
    text = json.dumps({**doc, "delivery_id": ident, "idempotency_key": f"k-{ident}"})
    if tail:  # inside the variables, where numbers are allowed
        text = text.replace('"variables": {', f'"variables": {{"zz": {tail}, ', 1)
    return text


async def _round_trip(dsn: str, drawn: list[tuple[dict[str, Any], str]]) -> int:
    parsed = [parse_command(_text(doc, tail), None) for doc, tail in drawn]
    commands = [c for c in parsed if isinstance(c, DeliveryCommand)]
    store = await Store.open(dsn, min_size=1, max_size=2)
    try:
        entries = [IntakeEntry(f"1-{i}", c, None, "") for i, c in enumerate(commands)]
        result = await store.ingest(entries, 3600)
        assert not result.rejected, result.rejected
        ids = [c.delivery_id for c in commands]
        async with store.pool.acquire() as conn:
            await conn.execute(
                "UPDATE mail.deliveries SET next_attempt_at = now() "
                "WHERE delivery_id = ANY($1::text[])",
                ids,
            )
        claims = {c.delivery_id: c for c in await store.claim_due(len(ids) + 5, 60, "rt")}
        reads = OperatorReads(store.pool)
        now = datetime.now(UTC)
        for cmd in commands:
            claim = claims[cmd.delivery_id]
            assert claim.unreadable is None, claim.unreadable
            assert claim.command is not None
            if cmd.expires_at is not None:
                assert claim.expires_at == cmd.expires_at
            record = await reads.delivery(cmd.delivery_id)
            assert record is not None
            view = delivery_detail(record, RetryPolicy((1.0, 1.0), 0.0), now)
            json.dumps(dump(view), allow_nan=False)
            assert record.send_at == cmd.send_at
    finally:
        await store.close()
    return len(commands)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(drawn=st.lists(accepted_or_not(), min_size=5, max_size=12))
def test_every_accepted_command_is_claimed_and_looked_up_as_it_was_given(
    pg_dsn: str, drawn: list[tuple[dict[str, Any], str]]
) -> None:
    asyncio.run(_round_trip(pg_dsn, drawn))
