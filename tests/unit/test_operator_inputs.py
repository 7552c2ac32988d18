"""Operator input validation: times, query parameters, cursors and request bodies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildaemon.errors import InvalidInput
from maildaemon.operator import bodies, inputs
from maildaemon.store.operator.filters import decode_cursor, encode_cursor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01t12:00:00z", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T14:00:00+02:00", datetime(2024, 5, 1, 12, tzinfo=UTC)),
        ("2024-05-01T12:00:00.1234567891Z", datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)),
        ("2016-12-31T23:59:60Z", datetime(2016, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
    ],
)
def test_rfc3339_times_are_read_as_utc(text: str, expected: datetime) -> None:
    assert inputs.parse_time(text, "t") == expected


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01",
        "2024-05-01T12:00:00",
        "2024-05-01 12:00:00Z",
        "2024-02-30T00:00:00Z",
        "2024-05-01T24:00:00Z",
        "2024-05-01T12:00:00+24:00",
        "0000-01-01T00:00:00Z",
        "yesterday",
        "2024-05-01T12:00:00Z\n",
    ],
)
def test_other_times_are_refused_naming_the_field(text: str) -> None:
    with pytest.raises(InvalidInput) as info:
        inputs.parse_time(text, "created_after")
    assert info.value.field == "created_after"


@given(
    st.datetimes(
        min_value=datetime(1, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.sampled_from([UTC, timezone(timedelta(hours=-7, minutes=-30))]),
    )
)
def test_any_isoformat_time_reads_back(value: datetime) -> None:
    assert inputs.parse_time(value.isoformat(), "t") == value


@given(
    st.datetimes(timezones=st.just(UTC)),
    st.text(min_size=1).filter(lambda s: "\0" not in s),
    st.booleans(),
)
def test_cursor_round_trip(when: datetime, key: str, flag: bool) -> None:
    cursor = encode_cursor("dl", flag, when, key)
    assert len(cursor) < 2000 and cursor.replace("-", "").replace("_", "").isalnum()
    assert decode_cursor(cursor, "dl", (bool, datetime, str)) == (flag, when, key)


_WHEN = datetime(2026, 5, 4, 3, 2, 1, tzinfo=UTC)  # fixed: the same test ids in every process


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "!!!",
        "e30",
        encode_cursor("d", _WHEN, "x"),
        encode_cursor("dl", 1, "x", "y"),
        encode_cursor("dl", True, "not a time", "x"),
        encode_cursor("dl", True, "2024-01-01T00:00", "x"),
        encode_cursor("dl", True, _WHEN, 5),
        encode_cursor("dl", True, _WHEN),
    ],
)
def test_foreign_or_forged_cursors_are_refused(cursor: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_cursor(cursor, "dl", (bool, datetime, str))
    assert info.value.field == "cursor"


def test_query_parameters_are_checked_one_by_one() -> None:
    flt, page = inputs.delivery_query(
        [("status", "queued"), ("recipient", "Bob@Example.COM"), ("limit", "10")]
    )
    assert (flt.status, flt.recipient, page.limit, page.after) == (
        "queued",
        "bob@example.com",
        10,
        None,
    )
    assert inputs.delivery_query([])[1].limit == inputs.DEFAULT_LIMIT
    for pairs, field in [
        ([("limit", "1"), ("limit", "2")], "limit"),
        ([("sort", "asc")], "sort"),
        ([("limit", "1.5")], "limit"),
        ([("limit", "501")], "limit"),
        ([("status", "QUEUED")], "status"),
        ([("source", "abc\n")], "source"),
    ]:
        with pytest.raises(InvalidInput) as info:
            inputs.delivery_query(pairs)
        assert info.value.field == field, pairs
    flt_dl, _ = inputs.dead_letter_query([("reply_class", "5xx"), ("reviewed", "false")])
    assert (flt_dl.reply_class, flt_dl.reviewed) == (5, False)
    with pytest.raises(InvalidInput):
        inputs.dead_letter_query([("reviewed", "1")])


def test_ids_are_checked() -> None:
    assert inputs.delivery_id("order/42:a@b") == "order/42:a@b"
    assert inputs.stream_entry_id("1700000000000-3") == "1700000000000-3"
    assert inputs.malformed_id("17") == 17
    for check, value in [
        (inputs.delivery_id, "-x"),
        (inputs.delivery_id, "a b"),
        (inputs.stream_entry_id, "1700000000000"),
        (inputs.malformed_id, "0"),
        (inputs.malformed_id, str(2**63)),
        (inputs.malformed_id, "-1"),
    ]:
        with pytest.raises(InvalidInput):
            check(value)


def test_bodies_are_strict_json_objects() -> None:
    body = bodies.parse_body(
        bodies.BulkRequeueBody, b'{"reply_code": 421.0, "created_after": "2024-01-01T00:00:00Z"}'
    )
    assert body.reply_code == 421 and body.created_after == datetime(2024, 1, 1, tzinfo=UTC)
    assert bodies.parse_body(bodies.PauseBody, b"  ").source is None
    for raw, field in [
        (b"{", "body"),
        (b"[]", "body"),
        (b"null", "body"),
        (b'{"limit": "5"}', "limit"),
        (b'{"limit": 5.5}', "limit"),
        (b'{"dry_run": 1}', "dry_run"),
        (b'{"what": 1}', "what"),
        (b'{"created_after": "2024-01-01"}', "created_after"),
        (b'{"rate_per_second": 0}', "rate_per_second"),
        (b'{"reason": "\\u0000"}', "reason"),
        (b'{"actor": "\\ud800"}', "body"),
    ]:
        with pytest.raises(InvalidInput) as info:
            bodies.parse_body(bodies.BulkRequeueBody, raw)
        assert info.value.field == field, raw


def test_actor_note_comes_from_the_body_then_the_header() -> None:
    assert inputs.actor_note("alice", "bob") == "alice"
    assert inputs.actor_note(None, "bob") == "bob"
    assert inputs.actor_note(None, None) is None
    for header in ("", "tab\there", "caf\u00e9"):
        with pytest.raises(InvalidInput) as info:
            inputs.actor_note("alice", header)
        assert info.value.field == "X-Operator"


def test_suppression_addresses_are_lower_cased() -> None:
    assert inputs.email_address("Carol@Example.COM") == "carol@example.com"
    for bad in ("carol", "carol@", "@example.com", "a b@example.com", "a@b@c", "x" * 250 + "@e.x"):
        with pytest.raises(InvalidInput):
            inputs.email_address(bad)
