"""``maildaemon bounces ingest|list|show``: reports after the relay's 250.

``ingest`` reads one message on stdin (a Postfix ``pipe`` transport, procmail, fetchmail)
and takes it in through the same path as the report listener. Its exit status is a
sysexits code, so the MTA retries when it should: 0 recorded (whatever the report turned
out to be: matched, unmatched, bad_token, unparseable), 65 (EX_DATAERR) for empty input,
the one thing that cannot be recorded, 75 (EX_TEMPFAIL) when PostgreSQL is down or the
settings cannot be read (the MTA keeps the report and tries again).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from typing import Any, BinaryIO

from maildaemon import errors
from maildaemon.cli import console_cmds
from maildaemon.cli.console_cmds import open_store
from maildaemon.cli.declare import Commands, arg, operator_options
from maildaemon.config import Settings, load_settings
from maildaemon.pipeline.reports import ReportIntake, bounded
from maildaemon.reports.model import KINDS, MATCH_STATUSES, Incoming, ReportRecord
from maildaemon.store.reports.db import ReportStore
from maildaemon.store.reports.records import Rate, Rates, StoredReport

EX_OK = 0
EX_DATAERR = 65
EX_TEMPFAIL = 75

command = Commands(
    {"bounces": "reports after the relay's 250: take one in, list and show them"},
    operator_options,
)


def register(sub: Any) -> None:
    command.install(sub)


def read_bounded(stream: BinaryIO, limit: int) -> tuple[bytes, int]:
    """The first ``limit`` octets of ``stream`` and its whole size (the rest is read and
    dropped, so the MTA's pipe does not block)."""
    kept = stream.read(limit)
    size = len(kept)
    while chunk := stream.read(65536):
        size += len(chunk)
    return kept, size


async def ingest(settings: Settings, incoming: Incoming) -> ReportRecord:
    store = await open_store(settings, 1)
    try:
        return await ReportIntake(settings, ReportStore(store.pool)).take(incoming)
    finally:
        await store.close()


@command(
    "bounces ingest",
    "take one report in from stdin (sysexits: 0 recorded, 65 empty, 75 try again)",
    arg(
        "--recipient",
        action="append",
        default=[],
        help="the envelope recipient (e.g. Postfix's ${original_recipient}); repeatable",
    ),
    arg("--sender", help="the envelope sender (e.g. Postfix's ${sender})"),
)
def cmd_ingest(args: argparse.Namespace) -> int:
    try:
        settings = console_cmds.scrubbed(load_settings())
    except errors.ConfigError as exc:
        print(f"maildaemon: {exc} (report not taken: try again)", file=sys.stderr)
        return EX_TEMPFAIL
    raw, size = read_bounded(sys.stdin.buffer, settings.bounce_max_bytes + 1)
    if not raw.strip():
        print("maildaemon: no report on stdin", file=sys.stderr)
        return EX_DATAERR
    kept, truncated = bounded(raw, settings.bounce_max_bytes)
    incoming = Incoming(kept, "ingest", args.sender, tuple(args.recipient), size, truncated)
    try:
        record = asyncio.run(ingest(settings, incoming))
    except (errors.StoreUnavailable, errors.StoreFailed, OSError) as exc:
        print(f"maildaemon: report not recorded, try again: {exc}", file=sys.stderr)
        return EX_TEMPFAIL
    if args.json:
        print(json.dumps(_record_json(record), ensure_ascii=False))
    else:
        print(
            f"report {record.report_id}: {record.kind}, {record.match_status}"
            + (f", delivery {record.delivery_id}" if record.delivery_id else "")
            + (" (already recorded)" if record.duplicate else "")
        )
    return EX_OK


def _record_json(record: ReportRecord) -> dict[str, Any]:
    return {
        "report_id": record.report_id,
        "kind": record.kind,
        "match_status": record.match_status,
        "delivery_id": record.delivery_id,
        "detail": record.detail,
        "duplicate": record.duplicate,
        "effects": list(record.effects),
    }


def _reports(work: Any) -> Any:
    settings = console_cmds.scrubbed(load_settings())

    async def main() -> Any:
        store = await open_store(settings, 1)
        try:
            return await work(ReportStore(store.pool))
        finally:
            await store.close()

    return asyncio.run(main())


def _table(reports: list[StoredReport]) -> str:
    lines = [f"{'id':>8}  {'received':<25} {'kind':<10} {'match':<11} {'delivery':<24} detail"]
    for r in reports:
        lines.append(
            f"{r.report_id:>8}  {r.received_at.isoformat(timespec='seconds'):<25} {r.kind:<10} "
            f"{r.match_status:<11} {(r.delivery_id or '-')[:24]:<24} {(r.detail or '')[:60]}"
        )
    return "\n".join(lines)


@command(
    "bounces list",
    "recent reports, newest first, with what each was matched to",
    arg("--match-status", dest="match_status", choices=MATCH_STATUSES, help="only this one"),
    arg("--kind", choices=KINDS, help="only this kind"),
    arg("--limit", type=int, default=50, help="how many (1-500, default 50)"),
    arg("--before", type=int, help="only reports older than this report id (paging)"),
)
def cmd_list(args: argparse.Namespace) -> int:
    limit = max(1, min(500, args.limit))
    reports: list[StoredReport] = _reports(
        lambda s: s.recent(limit, args.before, args.match_status, args.kind)
    )
    if args.json:
        print(json.dumps([r.as_json() for r in reports], indent=2, ensure_ascii=False))
    else:
        print(_table(reports))
    return EX_OK


@command(
    "bounces show",
    "one report: what it said, what it was matched to, and its raw bytes (--raw)",
    arg("report_id", type=int, help="the report's id"),
    arg("--raw", action="store_true", help="write the raw report to stdout"),
)
def cmd_show(args: argparse.Namespace) -> int:
    async def work(s: ReportStore) -> tuple[list[StoredReport], bytes | None]:
        found = [r for r in await s.recent(1, args.report_id + 1) if r.report_id == args.report_id]
        return found, (await s.raw(args.report_id) if args.raw and found else None)

    found, raw = _reports(work)
    if not found:
        print(f"maildaemon: no report {args.report_id}", file=sys.stderr)
        return 1
    if raw is not None:
        sys.stdout.buffer.write(raw)
        return EX_OK
    print(json.dumps(found[0].as_json(), indent=2, ensure_ascii=False))
    return EX_OK


def _rates_table(title: str, rates: list[Rate]) -> str:
    lines = [f"{title:<32} {'sent':>8} {'bounced':>8} {'rate':>7} {'complained':>10} {'rate':>7}"]
    for r in rates:
        b = f"{r.bounce_rate:.2%}" if r.bounce_rate is not None else "-"
        c = f"{r.complaint_rate:.2%}" if r.complaint_rate is not None else "-"
        lines.append(
            f"{r.key[:32]:<32} {r.sent:>8} {r.bounced:>8} {b:>7} {r.complained:>10} {c:>7}"
        )
    return "\n".join(lines)


@command(
    "bounces rates",
    "bounce and complaint rates per source and per recipient domain",
    arg("--hours", type=int, default=24, help="the window (1-720 hours, default 24)"),
)
def cmd_rates(args: argparse.Namespace) -> int:
    hours = max(1, min(720, args.hours))
    rates: Rates = _reports(lambda s: s.rates(hours))
    if args.json:
        print(json.dumps(dataclasses.asdict(rates), indent=2, ensure_ascii=False))
    else:
        print(f"last {hours} h\n")
        print(_rates_table("source", rates.by_source))
        print()
        print(_rates_table("recipient domain", rates.by_recipient_domain))
    return EX_OK
