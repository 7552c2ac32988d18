"""CLI commands added with the operator console: ``maildaemon preview`` (render a template
without sending) and the lookups of malformed records by delivery id."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from maildaemon import errors
from maildaemon.config import Settings, load_settings
from maildaemon.logs import add_secrets, scrub_standard_streams
from maildaemon.operator import inputs, mailview
from maildaemon.store.console.reads import ConsoleReads
from maildaemon.store.operator.records import MalformedCommand, MalformedPage
from maildaemon.store.pipeline.db import Store

# Commands that only write to Redis or render templates need no PostgreSQL and no SMTP
# server: these stand in for the settings they do not use.
_UNUSED_DSN = "postgresql://unused@127.0.0.1:1/unused"


async def open_store(settings: Settings, max_size: int = 1) -> Store:
    """A small pool for one CLI command (PgBouncer mode as the daemon's)."""
    return await Store.open(
        settings.dsn, min_size=1, max_size=max_size, pgbouncer=settings.postgres_pgbouncer
    )


def client_settings() -> Settings:
    """Settings for ``enqueue`` and ``preview``: Redis, limits and templates only.

    PostgreSQL is optional: when ``MAIL_POSTGRES_PRIMARY_DSN`` is set, ``enqueue`` uses it
    to judge commands the way the running daemon does; without it, that check is skipped
    with a warning."""
    try:
        return scrubbed(load_settings(smtp_mode="stub"))
    except errors.ConfigError as exc:
        if "MAIL_POSTGRES_PRIMARY_DSN" not in str(exc):
            raise
    return scrubbed(load_settings(postgres_primary_dsn=_UNUSED_DSN, smtp_mode="stub"))


def scrubbed(settings: Settings) -> Settings:
    """From here on no secret of these settings reaches stdout, stderr or a log line."""
    add_secrets(settings.secret_values())
    scrub_standard_streams()
    return settings


def malformed_for(delivery_id: str) -> list[MalformedCommand]:
    """The stream entries refused at intake that named ``delivery_id``."""
    settings = scrubbed(load_settings())

    async def work() -> list[MalformedCommand]:
        store = await open_store(settings)
        try:
            return await ConsoleReads(store.pool).malformed_for_delivery(delivery_id)
        finally:
            await store.close()

    return asyncio.run(work())


def malformed_page(delivery_id: str) -> MalformedPage:
    return MalformedPage(malformed_for(inputs.delivery_id(delivery_id)), None)


def not_found_hint(delivery_id: str) -> str:
    """Why there is no delivery ``delivery_id``: refused at intake, or never seen."""
    found = malformed_for(delivery_id)
    if not found:
        return f"no delivery {delivery_id!r} (and no refused stream entry named it)"
    lines = [f"no delivery {delivery_id!r}: refused at intake"]
    lines += [
        f"  malformed #{m.id} stream entry {m.stream_entry_id}: {m.failure_code}: "
        f"{m.failure_detail}"
        + (f" (replayed as {m.replayed_delivery_id})" if m.replayed_at else "")
        for m in found
    ]
    lines.append("  see: maildaemon malformed list --delivery-id " + delivery_id)
    return "\n".join(lines)


def cmd_preview(args: argparse.Namespace) -> int:
    from maildaemon.message.compose import Composer
    from maildaemon.message.preview import DEFAULT_SENDER, render_preview
    from maildaemon.message.render import TemplateCatalog

    settings = client_settings()
    variables: dict[str, Any] = {}
    for pair in args.var or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise errors.ConfigError(f"--var wants NAME=VALUE, not {pair!r}")
        variables[name] = value
    catalog = TemplateCatalog.load(settings.template_dir, settings.default_locale)
    composer = Composer(catalog, settings.smtp_from or DEFAULT_SENDER)
    try:
        data = render_preview(composer, args.template, args.locale, variables)
    except errors.RenderError as exc:
        print(f"maildaemon: preview failed: {exc}", file=sys.stderr)
        return 2
    if args.part == "eml":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return 0
    view = mailview.view(data)
    if args.part == "html":
        print(view.html if view.html is not None else "(no HTML part)")
    elif args.part == "text":
        print(view.text if view.text is not None else "(no text part)")
    else:
        print(f"Subject: {view.subject}\nFrom: {view.sender}\nTo: {view.to}\n")
        print(view.text if view.text is not None else "(no text part; see --html)")
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "preview",
        help="render a template with variables and a locale, without sending",
        description="Render a template of the catalog (MAIL_TEMPLATE_DIR) as the daemon "
        "would, to a placeholder recipient; nothing is sent and nothing is written.",
    )
    p.add_argument("--template", required=True, help="template_id, e.g. signin_code")
    p.add_argument("--locale", help="locale, e.g. de (default: MAIL_DEFAULT_LOCALE)")
    p.add_argument(
        "--var", action="append", metavar="NAME=VALUE", help="template variable (repeatable)"
    )
    part = p.add_mutually_exclusive_group()
    part.add_argument(
        "--html", dest="part", action="store_const", const="html", help="print the HTML part"
    )
    part.add_argument(
        "--text", dest="part", action="store_const", const="text", help="print the text part"
    )
    part.add_argument(
        "--eml",
        dest="part",
        action="store_const",
        const="eml",
        help="print the whole message as it would be sent (RFC 5322)",
    )
    p.set_defaults(handler=cmd_preview, part=None)
