"""Rendering a heavy (but accepted) command does not stall the event loop."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from maildaemon.config import Settings
from maildaemon.message.render import TemplateCatalog
from tests.support import Db, command, running_app, xadd

MakeSettings = Callable[..., Settings]
TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


async def test_heavy_rendering_runs_beside_the_loop(make_settings: MakeSettings) -> None:
    variables = {"title": "Digest", "body": "w\n\n" * 40_000}  # 120 KB, within every limit
    catalog = TemplateCatalog.load(TEMPLATES, "en")
    started = time.perf_counter()
    catalog.render("notification", "en", variables)
    render_s = time.perf_counter() - started
    assert render_s > 0.3, "the case must be heavy enough to show a stall"

    settings = make_settings(smtp_mode="stub")
    db = Db(settings.dsn)
    gaps: list[float] = []
    async with running_app(settings):
        stop = asyncio.Event()

        async def ticker() -> None:
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        await xadd(
            settings,
            *[
                command(f"heavy-{i}", template_id="notification", variables=variables)
                for i in range(3)
            ],
        )
        for i in range(3):
            await db.wait_status(f"heavy-{i}", "suppressed", "sent", timeout=60)
        stop.set()
        await tick
    # Three renders of render_s each ran while the loop kept ticking: on the loop, one
    # batch would stall it for about 3 x render_s; beside it, no pause comes near even one.
    assert max(gaps) < 0.75 * render_s, (max(gaps), render_s)
