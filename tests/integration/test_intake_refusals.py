"""A database refusal is one entry's record, not a stuck consumer (real PostgreSQL refusals
made by triggers: no fakes)."""

from __future__ import annotations

from collections.abc import Callable

import asyncpg

from maildaemon.config import Settings
from tests.support import Db, command, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]

REFUSE_DELIVERY = """
CREATE FUNCTION mail.test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.delivery_id LIKE 'refuse%' THEN
        RAISE EXCEPTION 'refused by test trigger' USING ERRCODE = 'check_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse BEFORE INSERT ON mail.deliveries
    FOR EACH ROW EXECUTE FUNCTION mail.test_refuse();
"""
REFUSE_RECORD_TEXT = """
CREATE FUNCTION mail.test_refuse_raw() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.raw LIKE '%refuse-twice%' OR NEW.delivery_id LIKE 'refuse-twice%' THEN
        RAISE EXCEPTION 'record refused by test trigger'
            USING ERRCODE = 'string_data_right_truncation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse_raw BEFORE INSERT ON mail.malformed_commands
    FOR EACH ROW EXECUTE FUNCTION mail.test_refuse_raw();
"""


async def _pending(settings: Settings) -> int:
    client = redis_client(settings.redis_master_addr)
    try:
        info = await client.xpending(settings.command_stream, settings.consumer_group)
        return int(info["pending"])
    finally:
        await client.aclose()


async def test_refused_entries_become_records_and_the_batch_goes_in(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    conn = await asyncpg.connect(settings.dsn)
    try:
        await conn.execute(REFUSE_DELIVERY)
        await conn.execute(REFUSE_RECORD_TEXT)
    finally:
        await conn.close()
    docs = [command("ok-1"), command("refuse-once"), command("refuse-twice"), command("ok-2")]
    async with running_app(settings) as app:
        ids = await xadd(settings, *docs)

        async def settled() -> bool:
            count = await db.fetchval(
                "SELECT (SELECT count(*) FROM mail.deliveries)"
                " + (SELECT count(*) FROM mail.malformed_commands)"
            )
            return count == len(docs) and await _pending(settings) == 0

        await wait_for(settled, timeout=30)
        assert not app._crashed
    delivered = {
        r["delivery_id"] for r in await db.fetch("SELECT delivery_id FROM mail.deliveries")
    }
    assert delivered == {"ok-1", "ok-2"}
    rows = {
        r["stream_entry_id"]: r
        for r in await db.fetch(
            "SELECT stream_entry_id, failure_code, delivery_id, raw, raw_truncated"
            " FROM mail.malformed_commands"
        )
    }
    assert set(rows) == {ids[1], ids[2]}
    once, twice = rows[ids[1]], rows[ids[2]]
    assert once["failure_code"] == "invalid_field" and once["delivery_id"] == "refuse-once"
    assert '"refuse-once"' in once["raw"]
    # Its first record was refused too: a bare one of ours, without the producer's text.
    assert twice["failure_code"] == "invalid_field" and twice["delivery_id"] is None
    assert twice["raw"] == "" and twice["raw_truncated"] is True
