"""The dispatcher's side of the webhook tables: fan-out, claims, results, backlog figures."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from maildaemon.store.pgerrors import translate_errors
from maildaemon.store.webhooks import statements as q
from maildaemon.store.webhooks.records import Backlog, Claim, Disabled, Outcome

Connection = asyncpg.Connection | PoolConnectionProxy
RESPONSE_CHARS = 1000  # what an attempt keeps of the answer


def _text(value: str | None, limit: int) -> str | None:
    """Storable text: no NUL (PostgreSQL refuses it), bounded."""
    if value is None:
        return None
    return value.replace("\x00", "\ufffd")[:limit]


async def fan_out(conn: Connection, outbox_ids: Sequence[int]) -> int:
    """Inside the outbox publisher's transaction, once Redis took the batch: these outbox
    rows into the webhook queues and out of the outbox. Returns the queue rows made."""
    if not outbox_ids:
        return 0
    return int(await conn.fetchval(q.FAN_OUT_AND_DELETE, list(outbox_ids)))


class WebhookStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def claim(
        self, per_endpoint: int, limit: int, lease_s: float, held: Sequence[int] = ()
    ) -> list[Claim]:
        async with (
            translate_errors("webhook claim", self.pool),
            self.pool.acquire() as conn,
            conn.transaction(),
        ):
            await conn.execute(q.CLAIM_LOCK)
            rows = await conn.fetch(q.CLAIM, per_endpoint, limit, lease_s, list(held))
        return [
            Claim(
                queue_id=r["id"],
                claim_token=r["claim_token"],
                endpoint_id=r["endpoint_id"],
                event_id=r["event_id"],
                attempt_no=r["attempts"],
                event_type=r["event_type"],
                fields=r["fields"],
                created_at=r["created_at"],
                url=r["url"],
                secrets=tuple(s for s in (r["secret"], r["previous_secret"]) if s),
            )
            for r in rows
        ]

    async def record(self, outcomes: Sequence[Outcome]) -> list[Disabled]:
        """Write a batch of attempts (fenced); returns the endpoints it disabled."""
        if not outcomes:
            return []
        async with translate_errors("webhook results", self.pool):
            rows = await self.pool.fetch(
                q.RECORD,
                [o.claim.queue_id for o in outcomes],
                [o.claim.claim_token for o in outcomes],
                [o.ok for o in outcomes],
                [o.http_status for o in outcomes],
                [o.duration_ms for o in outcomes],
                [_text(o.error, 500) for o in outcomes],
                [_text(o.response, RESPONSE_CHARS) for o in outcomes],
                [o.retry_in for o in outcomes],
                [o.exhausted for o in outcomes],
                [o.claim.attempt_no for o in outcomes],
            )
        return [Disabled(r["id"], r["url"]) for r in rows]

    async def backlog(self) -> list[Backlog]:
        async with translate_errors("webhook backlog", self.pool):
            rows = await self.pool.fetch(q.BACKLOG)
        return [Backlog(r["id"], r["enabled"], r["waiting"], r["oldest_age_s"]) for r in rows]

    async def ensure_dev_endpoint(self, url: str, secret: str) -> None:
        """``maildaemon dev``: its local receiver is the one dev endpoint, with this secret."""
        async with translate_errors("dev webhook endpoint", self.pool):
            await self.pool.execute(q.ENSURE_DEV_ENDPOINT, url, secret)

    async def purge(self, batch: int, age_s: float) -> int:
        async with translate_errors("webhook retention", self.pool):
            status = await self.pool.execute(q.PURGE_EVENTS, batch, age_s)
        return int(status.split()[-1])
