"""The running replicas: what each judges commands by (catalog and policy hashes), kept
fresh by a heartbeat, so the CLI can judge a replay the way the daemon will."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from maildaemon.store.pipeline.db import translate_errors

# A replica whose heartbeat is older than this many heartbeat intervals counts as gone.
HEARTBEAT_INTERVAL = 10.0
STALE_AFTER = 3 * HEARTBEAT_INTERVAL

_UPSERT = """
INSERT INTO mail.replicas (consumer_name, catalog_hash, policy_hash, template_ids)
VALUES ($1, $2, $3, $4)
ON CONFLICT (consumer_name) DO UPDATE
SET catalog_hash = excluded.catalog_hash, policy_hash = excluded.policy_hash,
    template_ids = excluded.template_ids, heartbeat_at = now(),
    started_at = CASE WHEN $5 THEN now() ELSE mail.replicas.started_at END
"""

_REMOVE = "DELETE FROM mail.replicas WHERE consumer_name = $1"

_LIVE = """
SELECT consumer_name, catalog_hash, policy_hash, template_ids, started_at, heartbeat_at
FROM mail.replicas
WHERE heartbeat_at > now() - make_interval(secs => $1)
ORDER BY consumer_name
"""


@dataclass(frozen=True, slots=True)
class Replica:
    """A running daemon and what it judges commands by."""

    consumer_name: str
    catalog_hash: str
    policy_hash: str
    template_ids: list[str]
    started_at: datetime
    heartbeat_at: datetime


@dataclass(frozen=True, slots=True)
class Identity:
    """What this replica records about itself."""

    consumer_name: str
    catalog_hash: str
    policy_hash: str
    template_ids: Sequence[str]


async def beat(pool: asyncpg.Pool, me: Identity, *, starting: bool = False) -> None:
    async with translate_errors("replica heartbeat", pool):
        await pool.execute(
            _UPSERT,
            me.consumer_name,
            me.catalog_hash,
            me.policy_hash,
            sorted(me.template_ids),
            starting,
        )


async def leave(pool: asyncpg.Pool, consumer_name: str) -> None:
    async with translate_errors("replica leave", pool):
        await pool.execute(_REMOVE, consumer_name)


async def live(pool: asyncpg.Pool) -> list[Replica]:
    """The replicas whose heartbeat is recent."""
    async with translate_errors("replica listing", pool):
        rows = await pool.fetch(_LIVE, STALE_AFTER)
    return [Replica(**dict(r)) for r in rows]
