"""Intake: stream entries into PostgreSQL exactly once, malformed ones recorded, nothing lost."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from maildaemon.config import Settings
from maildaemon.config_values import split_host_port
from maildaemon.message.policy import command_policy
from maildaemon.message.render import TemplateCatalog
from maildaemon.pipeline.consumer import StreamConsumer, entry_id_text, to_intake
from maildaemon.store.pipeline.db import Store
from maildaemon.telemetry import Telemetry
from tests.support import Db, TcpProxy, command, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]


async def _pending(settings: Settings) -> int:
    client = redis_client(settings.redis_master_addr)
    try:
        info = await client.xpending(settings.command_stream, settings.consumer_group)
        return int(info["pending"])
    finally:
        await client.aclose()


async def test_valid_command_becomes_one_delivery_with_payload(make_settings: MakeSettings) -> None:
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    async with running_app(settings):
        [entry_id] = await xadd(settings, command("in-1", priority="high", cc=["c@example.com"]))
        await wait_for(lambda: db.status("in-1"))
        await wait_for(lambda: _zero(settings))
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'in-1'"))[0]
    assert row["source"] == "authsession" and row["priority"] == 1
    assert row["to_addrs"] == ["alice@example.com"] and row["cc_addrs"] == ["c@example.com"]
    assert row["stream_entry_id"] == entry_id and row["template_id"] == "signin_code"
    payload = json.loads(
        await db.fetchval("SELECT command FROM mail.delivery_payloads WHERE delivery_id = 'in-1'")
    )
    assert payload["variables"] == {"code": "493817", "expires_minutes": 10}
    assert await db.fetchval("SELECT count(*) FROM mail.idempotency_reservations") == 1


async def _zero(settings: Settings) -> bool:
    """Every entry of the stream was read by the group and acknowledged."""
    client = redis_client(settings.redis_master_addr)
    try:
        groups = await client.xinfo_groups(settings.command_stream)
        stream = await client.xinfo_stream(settings.command_stream)
    finally:
        await client.aclose()
    group = next((g for g in groups if g["name"].decode() == settings.consumer_group), None)
    return (
        group is not None
        and group["pending"] == 0
        and group["last-delivered-id"] == stream["last-generated-id"]
    )


async def test_same_command_three_times_is_one_delivery(make_settings: MakeSettings) -> None:
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    doc = command("in-dup")
    async with running_app(settings):
        ids = await xadd(settings, doc, doc)
        await wait_for(lambda: db.status("in-dup"))
        ids += await xadd(settings, doc)
        await wait_for(lambda: db.fetchval("SELECT count(*) FROM mail.command_replays"))
        await wait_for(lambda: _zero(settings))
    assert await db.fetchval("SELECT count(*) FROM mail.deliveries") == 1
    assert await db.fetchval("SELECT count(*) FROM mail.malformed_commands") == 0
    replays = await db.fetch("SELECT stream_entry_id FROM mail.command_replays")
    assert sorted(r["stream_entry_id"] for r in replays) == sorted(ids[1:])


async def test_reused_key_with_different_command_is_an_idempotency_conflict(
    make_settings: MakeSettings,
) -> None:
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(
            settings,
            command("in-a", idempotency_key="shared"),
            command("in-b", idempotency_key="shared"),
        )
        await wait_for(lambda: db.fetchval("SELECT count(*) FROM mail.malformed_commands"))
    rows = await db.fetch("SELECT * FROM mail.malformed_commands")
    assert [(r["failure_code"], r["delivery_id"], r["source"]) for r in rows] == [
        ("idempotency_conflict", "in-b", "authsession")
    ]
    assert await db.status("in-b") is None


async def test_taken_delivery_id_under_another_key_is_a_conflict_and_frees_the_key(
    make_settings: MakeSettings,
) -> None:
    """A delivery id already on record, sent again under a new idempotency key: the second
    command is recorded as a delivery_id_conflict, the first delivery is untouched, and the
    key it tried to reserve stays free (a later, correct command may use it)."""
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    async with running_app(settings):
        await xadd(settings, command("in-same", idempotency_key="first"))
        await wait_for(lambda: db.status("in-same"))
        await xadd(
            settings,
            command("in-same", idempotency_key="second", priority="high"),
            command("in-other", idempotency_key="third"),
        )
        await wait_for(lambda: db.fetchval("SELECT count(*) FROM mail.malformed_commands"))
        await wait_for(lambda: db.status("in-other"))
        await xadd(settings, command("in-later", idempotency_key="second"))
        await wait_for(lambda: db.status("in-later"))
    [conflict] = await db.fetch("SELECT * FROM mail.malformed_commands")
    assert (conflict["failure_code"], conflict["delivery_id"]) == (
        "delivery_id_conflict",
        "in-same",
    )
    row = (await db.fetch("SELECT * FROM mail.deliveries WHERE delivery_id = 'in-same'"))[0]
    assert row["idempotency_key"] == "first" and row["priority"] != 1
    keys = await db.fetch(
        "SELECT idempotency_key, delivery_id FROM mail.idempotency_reservations ORDER BY 1"
    )
    assert [(k["idempotency_key"], k["delivery_id"]) for k in keys] == [
        ("first", "in-same"),
        ("second", "in-later"),
        ("third", "in-other"),
    ]


async def test_same_command_after_its_window_is_a_replay_not_a_second_delivery(
    make_settings: MakeSettings,
) -> None:
    """The idempotency reservation expired (retention removed it) but the delivery is on record:
    the same command again is a replay of it, not a conflict and not a new delivery."""
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    doc = command("in-expired")
    async with running_app(settings):
        await xadd(settings, doc)
        await wait_for(lambda: db.status("in-expired"))
        await db.fetchval("DELETE FROM mail.idempotency_reservations")  # as retention does
        await xadd(settings, doc)
        await wait_for(lambda: db.fetchval("SELECT count(*) FROM mail.command_replays"))
    assert await db.fetchval("SELECT count(*) FROM mail.deliveries") == 1
    assert await db.fetchval("SELECT count(*) FROM mail.malformed_commands") == 0


async def test_commit_without_ack_is_not_duplicated_after_restart(
    make_settings: MakeSettings,
) -> None:
    """A consumer that died after its commit but before XACK: the entry is reclaimed."""
    settings = make_settings(
        smtp_mode="stub", consumer_reclaim_idle="0.5s", consumer_name="dead-consumer"
    )
    db = Db(settings.dsn)
    client = redis_client(settings.redis_master_addr)
    await client.xgroup_create(
        settings.command_stream, settings.consumer_group, id="0", mkstream=True
    )
    await xadd(settings, command("in-crash"))
    # The dead consumer: read, commit to PostgreSQL, die before XACK.
    response = await client.xreadgroup(
        settings.consumer_group, "dead-consumer", {settings.command_stream: ">"}, count=10
    )
    catalog = TemplateCatalog.load(settings.template_dir, settings.default_locale)
    entries = [
        to_intake(entry_id_text(eid), fields, command_policy(settings, catalog))
        for eid, fields in response[0][1]
    ]
    store = await Store.open(settings.dsn)
    await store.ingest(entries, settings.idempotency_window)
    await store.close()
    assert await _pending(settings) == 1
    # A new process (another consumer name) takes the entry over once it is idle.
    restarted = settings.model_copy(update={"consumer_name": "new-consumer"})
    async with running_app(restarted):
        await wait_for(lambda: _zero(settings), timeout=10)
    await client.aclose()
    assert await db.fetchval("SELECT count(*) FROM mail.deliveries") == 1
    assert await db.fetchval("SELECT count(*) FROM mail.malformed_commands") == 0
    assert await db.fetchval("SELECT count(*) FROM mail.command_replays") == 1


def _hostile(rng: random.Random, i: int) -> tuple[Any, str | None]:
    """A malformed entry value and the failure code it must produce (None: any code)."""
    base = command(f"bad-{i}")
    kind = rng.randrange(16)
    if kind == 0:
        return rng.randbytes(rng.randrange(1, 200)), None
    if kind == 1:
        return "{" * rng.randrange(1, 5000), "invalid_json"
    if kind == 2:
        del base[rng.choice(["delivery_id", "source", "idempotency_key", "to", "payload_mode"])]
        return base, "missing_field"
    if kind == 3:
        base["to"] = [rng.choice(["no-at-sign", "a@b", "x@@y.example", "sp ace@ex.com", ""])]
        return base, None
    if kind == 4:
        base["headers"] = {"List-Id": "x\r\nBcc: victim@example.com"}
        return base, "header_injection"
    if kind == 5:
        base["template_id"] = "no_such_template"
        return base, "unknown_template"
    if kind == 6:
        base["source"] = "intruder"
        return base, "unknown_source"
    if kind == 7:
        base["payload_mode"] = rng.choice(["mjml", "", 7])
        return base, None
    if kind == 8:
        base["attachments"] = [
            {"filename": "big.bin", "content": base64.b64encode(b"x" * 300_000).decode()}
        ]
        return base, "attachment_too_large"
    if kind == 9:
        base["variables"] = {"code": "\u0000"}
        return base, "invalid_field"
    if kind == 10:
        return json.dumps(base).replace('"authsession"', '"\\ud800"'), None
    if kind == 11:
        base["priority"] = rng.choice(["urgent", 1, None, []])
        return base, None
    if kind == 12:
        return rng.choice(["[]", "null", "42", '"text"', "true"]), "invalid_json"
    if kind == 13:
        base["headers"] = {"Bcc": "x@example.com"}
        return base, "header_not_allowed"
    if kind == 14:
        base["to"] = [f"r{n}@example.com" for n in range(500)]
        return base, "too_many_recipients"
    base[rng.choice(["tamplate_id", "extra", "\u00e9"])] = 1
    return base, "unknown_field"


async def test_hostile_entries_mixed_with_valid_ones(make_settings: MakeSettings) -> None:
    settings = make_settings(
        smtp_mode="stub",
        attachment_max_bytes=100_000,
        attachments_total_max_bytes=200_000,
        consumer_batch_size=100,
    )
    db = Db(settings.dsn)
    rng = random.Random(20261123)
    client = redis_client(settings.redis_master_addr)
    expected: dict[str, str | None] = {}
    valid: list[str] = []
    async with running_app(settings) as app:
        pipe = client.pipeline(transaction=False)
        plan: list[tuple[str, Any, str | None]] = []
        for i in range(1000):
            if rng.random() < 0.3:
                valid.append(f"ok-{i}")
                plan.append(("valid", command(f"ok-{i}"), None))
            else:
                value, code = _hostile(rng, i)
                plan.append(("bad", value, code))
        for _, value, _code in plan:
            field = json.dumps(value) if isinstance(value, dict) else value
            if rng.random() < 0.05:
                pipe.xadd(settings.command_stream, {"payload": field, "x": "y"})
            else:
                pipe.xadd(settings.command_stream, {"command": field})
        ids = [i.decode() for i in await pipe.execute()]
        for (kind, _v, code), entry_id in zip(plan, ids, strict=True):
            if kind == "bad":
                expected[entry_id] = code
        await wait_for(lambda: _zero(settings), timeout=60)
        assert not app._crashed
    await client.aclose()
    delivered = {
        r["delivery_id"] for r in await db.fetch("SELECT delivery_id FROM mail.deliveries")
    }
    malformed = {
        r["stream_entry_id"]: r["failure_code"]
        for r in await db.fetch("SELECT stream_entry_id, failure_code FROM mail.malformed_commands")
    }
    wrapped = len(ids) - len(expected) - len(delivered)  # valid commands under a wrong field
    assert delivered <= set(valid)
    assert len(malformed) == len(expected) + wrapped
    for entry_id, code in expected.items():
        assert entry_id in malformed, entry_id
        if code is not None and malformed[entry_id] != "invalid_json":
            assert malformed[entry_id] == code, (entry_id, malformed[entry_id], code)


async def test_two_consumers_take_each_command_once(make_settings: MakeSettings) -> None:
    settings = make_settings(smtp_mode="stub", consumer_batch_size=50)
    db = Db(settings.dsn)
    docs = [command(f"two-{i}") for i in range(600)]
    a = settings.model_copy(update={"consumer_name": "replica-a"})
    b = settings.model_copy(
        update={"consumer_name": "replica-b", "internal_http_addr": "127.0.0.1:0"}
    )
    async with running_app(a), running_app(b):
        await xadd(settings, *docs[:300])
        await xadd(settings, *docs)  # the first 300 again: replays
        await wait_for(lambda: _zero(settings), timeout=30)
    assert await db.fetchval("SELECT count(*) FROM mail.deliveries") == 600
    assert await db.fetchval("SELECT count(*) FROM mail.malformed_commands") == 0
    assert await db.fetchval("SELECT count(*) FROM mail.command_replays") == 300


async def test_postgres_outage_pauses_intake_and_loses_nothing(
    make_settings: MakeSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL goes away mid-stream: the consumer waits, retries, and resumes."""
    base = make_settings(smtp_mode="stub")
    host, port = split_host_port(base.dsn.split("@", 1)[1].split("/", 1)[0], 5432)
    proxy = TcpProxy(host, port)
    await proxy.start()
    proxied_dsn = base.dsn.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}")
    settings = make_settings(smtp_mode="stub", postgres_primary_dsn=proxied_dsn)
    db = Db(base.dsn)
    caplog.set_level(logging.WARNING, logger="maildaemon.consumer")

    async def consumer_found_postgres_down() -> bool:
        return any(
            r.getMessage() == "postgres unavailable" and getattr(r, "component", "") == "consumer"
            for r in caplog.records
        )

    async with running_app(settings):
        await xadd(settings, *[command(f"out-{i}") for i in range(50)])
        await wait_for(lambda: _count(db, 50))
        await proxy.cut()
        await xadd(settings, *[command(f"out-{i}") for i in range(50, 150)])
        await wait_for(consumer_found_postgres_down, timeout=20)
        # Read, not committed: nothing new stored, and none of the 100 acknowledged.
        assert not await _count(db, 51)
        assert await _unacknowledged(settings) == 100
        await proxy.start()
        await wait_for(lambda: _count(db, 150), timeout=30)
        await wait_for(lambda: _zero(settings), timeout=10)
    await proxy.cut()
    assert await db.fetchval("SELECT count(*) FROM mail.deliveries") == 150
    assert await db.fetchval("SELECT count(*) FROM mail.malformed_commands") == 0


async def _unacknowledged(settings: Settings) -> int:
    """Entries of the stream the group has not acknowledged: pending or not yet read."""
    client = redis_client(settings.redis_master_addr)
    try:
        pending = int(
            (await client.xpending(settings.command_stream, settings.consumer_group))["pending"]
        )
        groups = await client.xinfo_groups(settings.command_stream)
        last = next(g["last-delivered-id"] for g in groups)
        unread = await client.xrange(settings.command_stream, min=b"(" + last, max="+")
        return pending + len(unread)
    finally:
        await client.aclose()


async def _count(db: Db, n: int) -> bool:
    return bool(await db.fetchval("SELECT count(*) FROM mail.deliveries") >= n)


async def test_consumer_group_is_created_from_the_start_of_the_stream(
    make_settings: MakeSettings,
) -> None:
    """Commands written before the daemon ever ran are taken in on first start."""
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    await xadd(settings, command("early-1"), command("early-2"))
    async with running_app(settings):
        await wait_for(lambda: _count(db, 2))
    assert {
        r["delivery_id"] for r in await db.fetch("SELECT delivery_id FROM mail.deliveries")
    } == {"early-1", "early-2"}


async def test_consumer_keeps_reading_when_redis_blips(make_settings: MakeSettings) -> None:
    settings = make_settings(smtp_mode="stub")
    store = await Store.open(settings.dsn)
    client = redis_client(settings.redis_master_addr)
    catalog = TemplateCatalog.load(settings.template_dir, settings.default_locale)
    woken: list[int] = []
    consumer = StreamConsumer(
        settings,
        client,
        store,
        command_policy(settings, catalog),
        Telemetry().instruments,
        lambda: woken.append(1),
    )
    task = asyncio.create_task(consumer.run())
    await xadd(settings, command("blip-1"))
    db = Db(settings.dsn)
    await wait_for(lambda: db.status("blip-1"))
    await client.connection_pool.disconnect()  # the link drops; the client reconnects
    await xadd(settings, command("blip-2"))
    await wait_for(lambda: db.status("blip-2"))
    consumer.stop()
    await asyncio.wait_for(task, 5)
    await client.aclose()
    await store.close()
    assert woken


async def test_departed_consumers_are_forgotten(make_settings: MakeSettings) -> None:
    settings = make_settings(
        smtp_mode="stub",
        consumer_reclaim_idle="0.5s",
        consumer_forget_idle="0.5s",
        consumer_name="current",
    )
    client = redis_client(settings.redis_master_addr)
    await client.xgroup_create(
        settings.command_stream, settings.consumer_group, id="0", mkstream=True
    )
    await client.xgroup_createconsumer(
        settings.command_stream, settings.consumer_group, "gone-replica"
    )
    await asyncio.sleep(0.6)
    async with running_app(settings):

        async def names() -> set[str]:
            infos = await client.xinfo_consumers(settings.command_stream, settings.consumer_group)
            return {i["name"].decode() for i in infos}

        await wait_for(lambda: _without(names, "gone-replica"), timeout=10)
        await xadd(settings, command("after-cleanup"))
        await wait_for(lambda: _zero(settings), timeout=10)
        assert "current" in await names()
    await client.aclose()


async def _without(names: Any, name: str) -> bool:
    return name not in await names()


async def test_deleted_stream_is_recreated_and_intake_goes_on(make_settings: MakeSettings) -> None:
    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    client = redis_client(settings.redis_master_addr)
    async with running_app(settings) as app:
        await xadd(settings, command("before-delete"))
        await wait_for(lambda: db.status("before-delete"))
        await client.delete(settings.command_stream)
        # At once: the XADD makes a new stream without the group, which the consumer
        # recreates from the start of that stream, so this entry is still read.
        await xadd(settings, command("after-delete"))
        await wait_for(lambda: db.status("after-delete"), timeout=15)
        assert not app._crashed
    await client.aclose()
