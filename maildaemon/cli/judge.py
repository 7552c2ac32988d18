"""One judgement for CLI and daemon: the CLI validates commands (``enqueue``, ``malformed
replay``) with the catalog on disk and its own MAIL_* settings, and the running daemon with
what it loaded. ``mail.replicas`` says what each live replica judges by; the CLI refuses
when they differ (see ``operator.replay.judge_alike``)."""

from __future__ import annotations

import asyncio
import sys

from maildaemon import errors
from maildaemon.cli.console_cmds import open_store
from maildaemon.config import Settings
from maildaemon.operator.replay import judge_alike
from maildaemon.store import replicas


async def daemon_disagrees(settings: Settings, catalog_hash: str, policy_hash: str) -> str | None:
    """Why a running daemon would judge a command otherwise than this catalog and policy, or
    None. Best effort (for ``enqueue``): PostgreSQL out of reach is a warning, not a refusal."""

    async def live() -> list[replicas.Replica]:
        store = await open_store(settings)
        try:
            return await replicas.live(store.pool)
        finally:
            await store.close()

    try:
        running = await asyncio.wait_for(live(), 5)
    except (errors.MailDaemonError, TimeoutError, OSError) as exc:
        print(
            f"maildaemon: warning: could not read which catalog the running daemon loaded "
            f"({type(exc).__name__}); validated against {settings.template_dir} only",
            file=sys.stderr,
        )
        return None
    try:
        judge_alike(running, catalog_hash, policy_hash, str(settings.template_dir))
    except errors.Conflict as exc:
        return str(exc)
    return None
