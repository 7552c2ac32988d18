"""No entry can stop intake; the work and the bytes one command and one batch cause are bounded."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from maildaemon.config import Settings
from maildaemon.contract.command import DeliveryCommand
from maildaemon.pipeline.stream_reader import BoundedReader
from tests.support import Db, command, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]


def _nest(levels: int) -> Any:
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return value


async def _settled(settings: Settings, db: Db, count: int) -> bool:
    client = redis_client(settings.redis_master_addr)
    try:
        info = await client.xpending(settings.command_stream, settings.consumer_group)
        pending = int(info["pending"])
        unread = await client.xlen(settings.command_stream)
    finally:
        await client.aclose()
    done = await db.fetchval(
        "SELECT (SELECT count(*) FROM mail.deliveries)"
        " + (SELECT count(*) FROM mail.malformed_commands)"
    )
    return pending == 0 and unread == count and done == count


async def test_deeply_nested_variables_are_a_record_not_a_crash(
    make_settings: MakeSettings,
) -> None:
    """The reported case: variables a few hundred levels deep used to pass validation and
    kill the consumer in json.dumps (RecursionError); every replica died on the same entry."""
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    variables = {"code": "1", "expires_minutes": 5}
    docs: list[dict[str, Any] | str] = [
        command("before"),
        command("deep-300", variables={**variables, "x": _nest(300)}),
        command("deep-900", variables={**variables, "x": _nest(900)}),
        json.dumps(command("deep-array"))[:-1] + ', "extra": ' + "[" * 5000 + "]" * 5000 + "}",
        command("after"),
    ]
    async with running_app(settings) as app:
        ids = await xadd(settings, *docs)
        await wait_for(lambda: _settled(settings, db, len(docs)), timeout=30)
        assert not app._crashed
        # Still taking commands in.
        await xadd(settings, command("later"))
        await wait_for(lambda: _settled(settings, db, len(docs) + 1), timeout=30)
    rows = await db.fetch(
        "SELECT stream_entry_id, failure_code FROM mail.malformed_commands ORDER BY id"
    )
    codes = {r["stream_entry_id"]: r["failure_code"] for r in rows}
    assert codes == {ids[1]: "too_deep", ids[2]: "too_deep", ids[3]: "invalid_json"}
    delivered = {
        r["delivery_id"] for r in await db.fetch("SELECT delivery_id FROM mail.deliveries")
    }
    assert delivered == {"before", "after", "later"}


async def test_any_exception_while_taking_one_command_in_is_its_record(
    make_settings: MakeSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection: hashing one command raises. That command becomes an `intake_error`
    record; the rest of its batch is taken in; the consumer keeps running."""
    original = DeliveryCommand.fingerprint

    def fingerprint(self: DeliveryCommand) -> bytes:
        if self.delivery_id.startswith("boom"):
            raise RecursionError("maximum recursion depth exceeded while encoding a JSON object")
        return original(self)

    monkeypatch.setattr(DeliveryCommand, "fingerprint", fingerprint)
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    docs = [command("ok-1"), command("boom-1"), command("ok-2"), command("boom-2")]
    async with running_app(settings) as app:
        ids = await xadd(settings, *docs)
        await wait_for(lambda: _settled(settings, db, len(docs)), timeout=30)
        assert not app._crashed
    rows = await db.fetch(
        "SELECT stream_entry_id, failure_code, delivery_id, failure_detail"
        " FROM mail.malformed_commands ORDER BY id"
    )
    assert [(r["stream_entry_id"], r["failure_code"], r["delivery_id"]) for r in rows] == [
        (ids[1], "intake_error", "boom-1"),
        (ids[3], "intake_error", "boom-2"),
    ]
    assert "RecursionError" in rows[0]["failure_detail"]
    delivered = {
        r["delivery_id"] for r in await db.fetch("SELECT delivery_id FROM mail.deliveries")
    }
    assert delivered == {"ok-1", "ok-2"}


async def test_reader_bounds_bytes_per_batch_and_never_reads_oversize_entries(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(smtp_mode="stub")
    client = redis_client(settings.redis_master_addr)
    try:
        await _read_bounded(client, settings.command_stream, settings.consumer_group)
    finally:
        await client.aclose()


async def _read_bounded(client: Any, stream: str, group: str) -> None:
    await client.xgroup_create(stream, group, id="0", mkstream=True)
    budget, max_entry = 256 * 1024, 100 * 1024
    sizes = [60 * 1024] * 10 + [500 * 1024] + [100] * 40 + [max_entry - 20, 3 * 1024 * 1024]
    ids = [(await client.xadd(stream, {"command": b"x" * size})).decode() for size in sizes]
    reader = BoundedReader(
        client, stream, group, "reader-a", max_count=500, budget=budget, max_entry=max_entry
    )
    seen: list[str] = []
    oversize: dict[str, int] = {}
    batches = 0
    while True:
        batch = await reader.read()
        if not batch:
            break
        batches += 1
        assert batch.entry_bytes <= budget
        seen += [eid.decode() for eid, _ in batch.entries]
        oversize.update((eid.decode(), size) for eid, size in batch.oversize)
        for eid, fields in batch.entries:
            assert len(fields[b"command"]) == sizes[ids.index(eid.decode())]
    assert sorted(seen + list(oversize)) == sorted(ids)  # each exactly once
    assert len(seen) == len(set(seen))
    assert oversize == {ids[10]: 500 * 1024 + 7, ids[-1]: 3 * 1024 * 1024 + 7}
    assert batches >= 3  # 10 x 60 KiB cannot come in fewer than 3 batches of 256 KiB
    # Everything is pending for reader-a until acked; another reader reclaims it, bounded too.
    other = BoundedReader(
        client, stream, group, "reader-b", max_count=500, budget=budget, max_entry=max_entry
    )
    reclaimed: list[str] = []
    while True:
        batch = await other.read(reclaim_idle_ms=0)
        assert batch.entry_bytes <= budget
        if not batch:
            break
        reclaimed += [eid.decode() for eid, _ in batch.entries]
        reclaimed += [eid.decode() for eid, _ in batch.oversize]
        done = [eid for eid, _ in batch.entries] + [eid for eid, _ in batch.oversize]
        await client.xack(stream, group, *done)
    assert sorted(reclaimed) == sorted(ids)


async def test_oversize_entry_is_recorded_without_its_text(make_settings: MakeSettings) -> None:
    settings = make_settings(
        smtp_mode="stub",
        command_max_bytes=64 * 1024,
        attachment_max_bytes=16 * 1024,
        attachments_total_max_bytes=32 * 1024,
        consumer_batch_max_bytes=128 * 1024,
    )
    db = Db(settings.dsn)
    huge = json.dumps(command("huge", variables={"code": "1" * 200_000, "expires_minutes": 5}))
    async with running_app(settings) as app:
        ids = await xadd(settings, command("small-1"), huge, command("small-2"))
        await wait_for(lambda: _settled(settings, db, 3), timeout=30)
        assert not app._crashed
    rows = await db.fetch(
        "SELECT stream_entry_id, failure_code, failure_detail, raw, raw_truncated"
        " FROM mail.malformed_commands"
    )
    assert len(rows) == 1
    row = rows[0]
    assert row["stream_entry_id"] == ids[1] and row["failure_code"] == "too_large"
    assert row["raw"] == "" and row["raw_truncated"] is True
    assert f"the limit is {64 * 1024}" in row["failure_detail"]
