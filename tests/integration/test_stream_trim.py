"""Trimming the command stream: only entries every consumer group has acknowledged go.

Against a real Redis: pending entries (whoever holds them, after a reclaim too), entries
not yet delivered to a group, a second group far behind, a stream without a group, ids
beyond a double's precision, replicas trimming at once, a trimmer killed mid-trim, and the
daemon itself (two replicas) trimming what it took in while a dead replica's entries wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable

import redis.asyncio as aioredis

from maildaemon.config import Settings
from maildaemon.config_values import split_host_port
from maildaemon.devstack.postgres import pick_free_port
from maildaemon.pipeline.stream_trim import StreamTrim
from tests.support import Db, TcpProxy, command, redis_client, running_app, wait_for, xadd

MakeSettings = Callable[..., Settings]
STREAM = "mail:delivery_commands"
GROUP = "maildaemon"


async def _fill(r: aioredis.Redis, n: int, stream: str = STREAM) -> list[bytes]:
    async with r.pipeline(transaction=False) as pipe:
        for i in range(n):
            pipe.xadd(stream, {"command": f"entry {i}"})
        return list(await pipe.execute())


async def _read(r: aioredis.Redis, consumer: str, count: int, group: str = GROUP) -> list[bytes]:
    res = await r.xreadgroup(group, consumer, {STREAM: ">"}, count=count)
    return [eid for eid, _ in res[0][1]] if res else []


async def _ids(r: aioredis.Redis) -> list[bytes]:
    return [eid for eid, _ in await r.xrange(STREAM)]


async def _pending_ids(r: aioredis.Redis, group: str = GROUP) -> list[bytes]:
    rows = await r.xpending_range(STREAM, group, "-", "+", 1_000_000)
    return [row["message_id"] for row in rows]


def _order(eid: bytes) -> tuple[int, int]:
    ms, seq = eid.split(b"-")
    return int(ms), int(seq)


async def test_pending_and_undelivered_entries_stay(redis_addr: str) -> None:
    r = redis_client(redis_addr)
    try:
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids = await _fill(r, 20)
        read = await _read(r, "a", 10)
        await r.xack(STREAM, GROUP, *read[:4], read[6])  # 4 and 5 pending, 6 acked
        result = await StreamTrim(r, STREAM).once()
        assert result.removed == 4 and result.floor == ids[4].decode()
        assert await _ids(r) == ids[4:]  # the pending ones and every undelivered one
        # Acknowledged all: the floor is the last delivered entry; undelivered ones stay.
        await r.xack(STREAM, GROUP, *read)
        result = await StreamTrim(r, STREAM).once()
        assert result.floor == ids[9].decode()
        assert await _ids(r) == ids[9:]
        assert await StreamTrim(r, STREAM).once() == type(result)(0, ids[9].decode(), 1)
    finally:
        await r.aclose()


async def test_a_reclaimed_entry_is_kept_until_acknowledged(redis_addr: str) -> None:
    r = redis_client(redis_addr)
    try:
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids = await _fill(r, 6)
        dead = await _read(r, "dead-replica", 3)  # read, never acknowledged
        await r.xack(STREAM, GROUP, *await _read(r, "b", 3))
        claimed = await r.xautoclaim(STREAM, GROUP, "b", 0, "0-0", justid=True)
        assert sorted(claimed) == dead  # now b's, still pending
        await StreamTrim(r, STREAM).once()
        assert await _ids(r) == ids  # nothing trimmed: the oldest is still pending
        await r.xack(STREAM, GROUP, dead[0])
        await StreamTrim(r, STREAM).once()
        assert await _ids(r) == ids[1:]
    finally:
        await r.aclose()


async def test_the_group_furthest_behind_and_a_stream_without_groups(redis_addr: str) -> None:
    r = redis_client(redis_addr)
    try:
        ids = await _fill(r, 8)
        assert (await StreamTrim(r, STREAM).once()).floor is None  # no group: keep all
        assert await _ids(r) == ids
        await r.xgroup_create(STREAM, GROUP, id="0")
        await r.xgroup_create(STREAM, "audit", id="0")
        await r.xack(STREAM, GROUP, *await _read(r, "a", 8))
        await StreamTrim(r, STREAM).once()
        assert await _ids(r) == ids  # the audit group has read nothing yet
        await r.xack(STREAM, "audit", *await _read(r, "x", 3, group="audit"))
        result = await StreamTrim(r, STREAM).once()
        assert result.groups == 2 and await _ids(r) == ids[2:]
        missing = await StreamTrim(r, "no-such-stream").once()
        assert missing.floor is None and missing.removed == 0
    finally:
        await r.aclose()


async def test_ids_beyond_double_precision_compare_exactly(redis_addr: str) -> None:
    r = redis_client(redis_addr)
    try:
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        big = 2**53 + 1  # 9007199254740993: as a Lua number it would equal 2**53
        ids = [f"{big - 1}-5", f"{big}-1", f"{big}-2", f"{big}-10"]
        for eid in ids:
            await r.xadd(STREAM, {"command": "x"}, id=eid)
        read = await _read(r, "a", 4)
        await r.xack(STREAM, GROUP, read[0], read[1], read[3])  # f"{big}-2" pending
        result = await StreamTrim(r, STREAM).once()
        assert result.floor == f"{big}-2"
        assert [i.decode() for i in await _ids(r)] == ids[2:]
    finally:
        await r.aclose()


async def test_in_steps_to_the_floor(redis_addr: str) -> None:
    r = redis_client(redis_addr)
    try:
        await r.config_set("stream-node-max-entries", "10")
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids = await _fill(r, 105)
        read = await _read(r, "a", 100)
        await r.xack(STREAM, GROUP, *read[:97])
        trim = StreamTrim(r, STREAM)
        removed = [(await trim.once(step=20)).removed for _ in range(7)]
        assert max(removed) <= 20 + 10  # whole nodes up to the step, then one node's rest
        assert sum(removed) == 97 and removed[-1] == 0
        assert await _ids(r) == ids[97:]
    finally:
        with contextlib.suppress(Exception):
            await r.config_set("stream-node-max-entries", "100")
        await r.aclose()


async def test_replicas_trimming_while_consumers_read_never_trim_a_pending_entry(
    redis_addr: str,
) -> None:
    r = redis_client(redis_addr)
    clients = [redis_client(redis_addr) for _ in range(4)]
    try:
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids = await _fill(r, 3000)
        done = asyncio.Event()
        lost: list[bytes] = []

        async def consume(c: aioredis.Redis, name: str) -> None:
            while True:
                got = await _read(c, name, 7)
                if not got:
                    return
                # Still in the stream while pending, whatever the trimmers did meanwhile.
                present = {eid for eid, _ in await c.xrange(STREAM, got[0], got[-1])}
                lost.extend(eid for eid in got if eid not in present)
                await c.xack(STREAM, GROUP, *got[:-1])  # the last one stays pending
                await c.xautoclaim(STREAM, GROUP, name, 0, "0-0", count=2, justid=True)

        async def trimmer(c: aioredis.Redis) -> None:
            trim = StreamTrim(c, STREAM)
            while not done.is_set():
                await trim.once(step=50)
                await asyncio.sleep(0)

        trimmers = [asyncio.create_task(trimmer(c)) for c in clients[2:]]
        await asyncio.gather(consume(clients[0], "a"), consume(clients[1], "b"))
        done.set()
        await asyncio.gather(*trimmers)
        assert not lost
        pending = await _pending_ids(r)
        assert pending, "some entries stayed pending (else the check is idle)"
        present = set(await _ids(r))
        assert set(pending) <= present
        await StreamTrim(r, STREAM).once()
        assert (await _ids(r))[0] == min(pending, key=_order)
        assert len(ids) > len(await _ids(r))  # and it did trim
    finally:
        for c in (r, *clients):
            await c.aclose()


_TRIM_FOREVER = """
import asyncio, sys
import redis.asyncio as aioredis
from maildaemon.pipeline.stream_trim import StreamTrim

async def main() -> None:
    host, port = sys.argv[1].rsplit(":", 1)
    r = aioredis.Redis(host=host, port=int(port))
    trim = StreamTrim(r, sys.argv[2])
    print("trimming", flush=True)
    while True:
        await trim.once(step=10)

asyncio.run(main())
"""


async def test_a_trimmer_killed_mid_trim_removed_only_acknowledged_entries(
    redis_addr: str,
) -> None:
    r = redis_client(redis_addr)
    try:
        await r.config_set("stream-node-max-entries", "5")
        await r.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
        ids = await _fill(r, 40_000)
        read = await _read(r, "a", 30_000)
        keep = set(read[20_000::997])  # scattered entries left pending
        await r.xack(STREAM, GROUP, *(eid for eid in read if eid not in keep))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _TRIM_FOREVER,
            redis_addr,
            STREAM,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        assert proc.stdout is not None
        assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"trimming\n"

        async def partly_trimmed() -> bool:
            return bool(0 < 40_000 - await r.xlen(STREAM) < 20_000)

        await wait_for(partly_trimmed, timeout=20, interval=0.001)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        left = await _ids(r)
        assert set(keep) <= set(left)
        assert left == ids[len(ids) - len(left) :]  # a prefix went, nothing in the middle
        while not (await StreamTrim(r, STREAM).once()).done:
            pass
        assert (await _ids(r))[0] == min(keep, key=_order)
    finally:
        with contextlib.suppress(Exception):
            await r.config_set("stream-node-max-entries", "100")
        await r.aclose()


async def test_daemon_replicas_trim_what_they_took_in_and_keep_a_dead_replicas_entries(
    make_settings: MakeSettings,
) -> None:
    replicas = [
        make_settings(
            smtp_mode="stub",
            consumer_name=f"trim-replica-{n}",
            internal_http_addr=f"127.0.0.1:{pick_free_port()}",
            command_stream_trim_interval="0.1s",
            consumer_reclaim_idle="2s",
        )
        for n in range(2)
    ]
    s = replicas[0]
    db = Db(s.dsn)
    r = redis_client(s.redis_master_addr)
    try:
        await r.xgroup_create(s.command_stream, s.consumer_group, id="0", mkstream=True)
        dead_ids = await xadd(s, *(command(f"dead-{i}") for i in range(5)))
        # A replica read these and died before its transaction committed.
        assert len(await _read(r, "killed-replica", 5)) == 5
        async with contextlib.AsyncExitStack() as stack:
            apps = [await stack.enter_async_context(running_app(x)) for x in replicas]
            await xadd(s, *(command(f"live-{i}") for i in range(60)))
            # A malformed entry and one over MAIL_COMMAND_MAX_BYTES end as records first.
            bad = await xadd(s, "not json", "x" * (s.command_max_bytes + 1))

            async def live_in() -> bool:
                n = await db.fetchval(
                    "SELECT count(*) FROM mail.deliveries WHERE delivery_id LIKE 'live-%'"
                )
                return bool(n == 60)

            await wait_for(live_in, timeout=30)
            # Trimmed past nothing pending: the dead replica's entries are all still there.
            for eid in dead_ids:
                assert await r.xrange(s.command_stream, eid, eid)

            async def all_in_and_trimmed() -> bool:
                n = await db.fetchval("SELECT count(*) FROM mail.deliveries")
                m = await db.fetchval("SELECT count(*) FROM mail.malformed_commands")
                return bool(n == 65 and m == 2 and await r.xlen(s.command_stream) <= 1)

            await wait_for(all_in_and_trimmed, timeout=30)
            gauges = [a.telemetry.instruments for a in apps]
            assert min(g.command_stream_length for g in gauges) <= 1
            assert all(g.command_stream_memory > 0 for g in gauges)
        rows = await db.fetch(
            "SELECT stream_entry_id FROM mail.deliveries WHERE delivery_id LIKE 'dead-%'"
        )
        assert sorted(row["stream_entry_id"] for row in rows) == sorted(dead_ids)
        rows = await db.fetch("SELECT stream_entry_id, failure_code FROM mail.malformed_commands")
        assert "too_large" in {r["failure_code"] for r in rows}
        assert sorted(r["stream_entry_id"] for r in rows) == sorted(bad)
    finally:
        await r.aclose()


async def test_while_postgres_is_down_nothing_read_but_uncommitted_is_trimmed(
    make_settings: MakeSettings,
) -> None:
    base = make_settings(smtp_mode="stub")
    host, port = split_host_port(base.dsn.split("@", 1)[1].split("/", 1)[0], 5432)
    proxy = TcpProxy(host, port)
    await proxy.start()
    s = make_settings(
        smtp_mode="stub",
        postgres_primary_dsn=base.dsn.replace(f"{host}:{port}", f"127.0.0.1:{proxy.port}"),
        command_stream_trim_interval="0.1s",
    )
    db = Db(base.dsn)
    r = redis_client(s.redis_master_addr)
    try:
        async with running_app(s) as app:
            await xadd(s, *(command(f"pg-{i}") for i in range(50)))

            async def count(n: int) -> bool:
                return bool(await db.fetchval("SELECT count(*) FROM mail.deliveries") == n)

            await wait_for(lambda: count(50), timeout=20)
            await proxy.cut()
            waiting = await xadd(s, *(command(f"pg-{i}") for i in range(50, 150)))

            async def trimmed_during_the_outage() -> bool:
                pending = (await r.xpending(s.command_stream, s.consumer_group))["pending"]
                # A trim after the consumer read (and could not commit) the first of the
                # 100: the entry before them (the old floor) is gone, not one of them.
                return bool(pending > 0 and app.telemetry.instruments.command_stream_length == 100)

            await wait_for(trimmed_during_the_outage, timeout=20)
            present = {eid.decode() for eid, _ in await r.xrange(s.command_stream)}
            assert present == set(waiting)
            await proxy.start()
            await wait_for(lambda: count(150), timeout=30)

            async def trimmed() -> bool:
                return bool(await r.xlen(s.command_stream) <= 1)

            await wait_for(trimmed, timeout=15)
        await proxy.cut()
    finally:
        await r.aclose()


async def test_an_interval_of_zero_never_trims(make_settings: MakeSettings) -> None:
    s = make_settings(smtp_mode="stub", command_stream_trim_interval="0")
    db = Db(s.dsn)
    r = redis_client(s.redis_master_addr)
    try:
        async with running_app(s) as app:
            await xadd(s, *(command(f"off-{i}") for i in range(5)))

            async def taken_in() -> bool:
                return bool(await db.fetchval("SELECT count(*) FROM mail.deliveries") == 5)

            await wait_for(taken_in)
            assert not app.telemetry.instruments.command_stream_length  # never observed
        assert await r.xlen(s.command_stream) == 5  # and it stopped cleanly (exit code 0)
    finally:
        await r.aclose()
