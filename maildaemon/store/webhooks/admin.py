"""The operator's webhook actions: endpoints added, listed, disabled, enabled, removed,
secrets rotated, pings and replays queued — each audited in ``mail.operator_actions``."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from maildaemon.errors import NotFound
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.operator.records import Actor
from maildaemon.store.pgerrors import translate_errors
from maildaemon.store.webhooks import statements as q
from maildaemon.store.webhooks.records import (
    AttemptList,
    Endpoint,
    EndpointChange,
    EndpointList,
    EndpointSecret,
    Replay,
    WebhookAttempt,
)


def _endpoint(r: asyncpg.Record) -> Endpoint:
    return Endpoint(
        id=r["id"],
        url=r["url"],
        events=list(r["events"]) if r["events"] is not None else None,
        source=r["source"],
        enabled=r["enabled"],
        disabled_reason=r["disabled_reason"],
        backlog=r["backlog"],
        rotation_ends_at=r["previous_until"],
        created_at=r["created_at"],
        updated_at=r["updated_at"],
    )


def _missing(endpoint_id: int) -> NotFound:
    return NotFound(f"no webhook endpoint {endpoint_id}")


class WebhookAdmin(OperatorStore):
    async def add_endpoint(
        self,
        url: str,
        events: list[str] | None,
        source: str | None,
        secret: str,
        who: Actor,
        reason: str | None,
    ) -> EndpointSecret:
        async with self._action("webhook add") as tx:
            row = await tx.conn.fetchrow(q.ADD_ENDPOINT, url, events, source, secret)
            assert row is not None
            action_id = await tx.record(
                who, "webhook.add", str(row["id"]), reason, url=url, events=events, source=source
            )
        return EndpointSecret(_endpoint(row), secret, action_id)

    async def webhook_endpoints(self) -> EndpointList:
        async with translate_errors("webhook endpoints", self.pool):
            rows = await self.pool.fetch(q.LIST_ENDPOINTS)
        return EndpointList([_endpoint(r) for r in rows])

    async def webhook_endpoint(self, endpoint_id: int) -> Endpoint:
        async with translate_errors("webhook endpoint", self.pool):
            row = await self.pool.fetchrow(q.GET_ENDPOINT, endpoint_id)
        if row is None:
            raise _missing(endpoint_id)
        return _endpoint(row)

    async def set_enabled(
        self, endpoint_id: int, enabled: bool, who: Actor, reason: str | None
    ) -> EndpointChange:
        verb = "enable" if enabled else "disable"
        async with self._action(f"webhook {verb}") as tx:
            why = f"disabled by {who.identity}" + (f": {reason}" if reason else "")
            if await tx.conn.fetchval(q.SET_ENABLED, endpoint_id, enabled, why) is None:
                raise _missing(endpoint_id)
            action_id = await tx.record(who, f"webhook.{verb}", str(endpoint_id), reason)
        return EndpointChange(endpoint_id, f"{verb}d", None, action_id)

    async def remove(self, endpoint_id: int, who: Actor, reason: str | None) -> EndpointChange:
        async with self._action("webhook remove") as tx:
            if await tx.conn.fetchval(q.REMOVE_ENDPOINT, endpoint_id) is None:
                raise _missing(endpoint_id)
            action_id = await tx.record(who, "webhook.remove", str(endpoint_id), reason)
        return EndpointChange(endpoint_id, "removed", None, action_id)

    async def rotate_secret(
        self, endpoint_id: int, secret: str, grace_s: float, who: Actor, reason: str | None
    ) -> EndpointSecret:
        async with self._action("webhook rotate-secret") as tx:
            if await tx.conn.fetchval(q.ROTATE_SECRET, endpoint_id, secret, grace_s) is None:
                raise _missing(endpoint_id)
            action_id = await tx.record(
                who, "webhook.rotate_secret", str(endpoint_id), reason, grace_s=grace_s
            )
            row = await tx.conn.fetchrow(q.GET_ENDPOINT, endpoint_id)
        assert row is not None
        return EndpointSecret(_endpoint(row), secret, action_id)

    async def ping(self, endpoint_id: int, who: Actor, reason: str | None) -> EndpointChange:
        async with self._action("webhook test") as tx:
            event_id = await tx.conn.fetchval(q.PING, endpoint_id)
            if event_id is None:
                raise _missing(endpoint_id)
            action_id = await tx.record(
                who, "webhook.test", str(endpoint_id), reason, event_id=event_id
            )
        return EndpointChange(endpoint_id, "ping_queued", event_id, action_id)

    async def replay_events(
        self,
        endpoint_id: int,
        event_id: int | None,
        after: datetime | None,
        before: datetime | None,
        dry_run: bool,
        who: Actor,
        reason: str | None,
    ) -> Replay:
        args = (endpoint_id, event_id, after, before)
        await self.webhook_endpoint(endpoint_id)  # NotFound first
        if dry_run:
            async with translate_errors("webhook replay", self.pool):
                matched = int(await self.pool.fetchval(q.REPLAY_COUNT, *args))
            return Replay(endpoint_id, True, matched, 0, None)
        async with self._action("webhook replay") as tx:
            queued = int(await tx.conn.fetchval(q.REPLAY, *args))
            action_id = await tx.record(
                who,
                "webhook.replay",
                str(endpoint_id),
                reason,
                event_id=event_id,
                after=after,
                before=before,
                queued=queued,
            )
        return Replay(endpoint_id, False, queued, queued, action_id)

    async def webhook_attempts(self, endpoint_id: int | None, limit: int) -> AttemptList:
        async with translate_errors("webhook attempts", self.pool):
            rows = await self.pool.fetch(q.RECENT_ATTEMPTS, endpoint_id, limit)
        return AttemptList([WebhookAttempt(**dict(r)) for r in rows])
