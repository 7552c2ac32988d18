"""Operator commands: the internal API's reads and actions, straight against PostgreSQL.

``maildaemon deliveries show|list|requeue|cancel``, ``maildaemon dead-letters
list|review|requeue``, ``maildaemon malformed list|replay``, ``maildaemon commands show``,
``maildaemon suppressions list|add|remove``, ``maildaemon pause|resume``, ``maildaemon
stats`` and ``maildaemon audit``. They use the daemon's settings (MAIL_*), validate their
input exactly as the HTTP API does, print a table or (``--json``) the API's JSON, and record
every action as ``$USER@cli`` (``--actor`` is kept as a note). A replay is judged the way the
running daemon judges: it is refused while a live replica loaded another catalog or policy.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from maildaemon import errors
from maildaemon.cli import console_cmds, tables
from maildaemon.cli.console_cmds import open_store
from maildaemon.config import Settings, load_settings
from maildaemon.contract.command import FAILURE_CODES
from maildaemon.operator import inputs
from maildaemon.operator import model as m
from maildaemon.operator import views as v
from maildaemon.retry import RetryPolicy
from maildaemon.store.operator import filters
from maildaemon.store.operator.actions import OperatorStore
from maildaemon.store.operator.records import Actor

T = TypeVar("T")
EXIT_REFUSED = 1  # not found, conflict
EXIT_INVALID = 2  # bad input (as argparse)
_TIME = "RFC 3339 time, e.g. 2026-05-01T12:00:00Z"


def _run(work: Callable[[OperatorStore, Settings], Awaitable[T]]) -> T:
    settings = console_cmds.scrubbed(load_settings())

    async def main() -> T:
        store = await open_store(settings, 2)
        try:
            return await work(OperatorStore(store.pool), settings)
        finally:
            await store.close()

    return asyncio.run(main())


def _out(args: argparse.Namespace, view: Any) -> int:
    if args.json:
        print(json.dumps(v.dump(view), indent=2, ensure_ascii=False))
    else:
        print(tables.render(view))
    return 0


def _handler(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Refusals become one line on stderr and an exit code, as elsewhere in the CLI."""

    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except errors.InvalidInput as exc:
            print(f"maildaemon: {exc}", file=sys.stderr)
            return EXIT_INVALID
        except errors.OperatorError as exc:
            print(f"maildaemon: {exc}", file=sys.stderr)
            return EXIT_REFUSED

    return run


def _pairs(args: argparse.Namespace, names: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            pairs.append((name, str(value).lower() if isinstance(value, bool) else str(value)))
    return pairs


def _actor(args: argparse.Namespace) -> Actor:
    """The OS user acts (as ``user@cli``); ``--actor`` is only a note in the audit detail."""
    note: str | None = args.actor
    if note is not None:
        inputs.check(
            inputs.ACTOR, note, "actor", "must be 1-200 characters without control characters"
        )
    return Actor(f"{getpass.getuser()}@cli", note)


def _reason(args: argparse.Namespace) -> str | None:
    reason: str | None = args.reason
    if reason is not None:
        inputs.check(inputs.FREE_TEXT, reason, "reason", "must not contain NUL")
    return reason


# --- commands ----------------------------------------------------------------------------


@_handler
def cmd_show(args: argparse.Namespace) -> int:
    delivery_id = inputs.delivery_id(args.delivery_id)

    async def work(ops: OperatorStore, s: Settings) -> v.DeliveryDetail | None:
        record = await ops.delivery(delivery_id)
        return (
            None
            if record is None
            else m.delivery_detail(record, RetryPolicy(s.retry_ladder, s.retry_jitter))
        )

    detail = _run(work)
    if detail is None:
        raise errors.NotFound(console_cmds.not_found_hint(delivery_id))
    return _out(args, detail)


@_handler
def cmd_list(args: argparse.Namespace) -> int:
    flt, page = inputs.delivery_query(_pairs(args, [p.name for p in inputs.DELIVERY_PARAMS]))
    return _out(args, _run(lambda ops, _: ops.deliveries(flt, page)))


@_handler
def cmd_requeue(args: argparse.Namespace) -> int:
    delivery_id, actor, reason = inputs.delivery_id(args.delivery_id), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.requeue(delivery_id, actor, reason, args.dry_run)))


@_handler
def cmd_cancel(args: argparse.Namespace) -> int:
    delivery_id, actor, reason = inputs.delivery_id(args.delivery_id), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.cancel(delivery_id, actor, reason, args.dry_run)))


_DL_FILTERS = (
    "source",
    "recipient_domain",
    "reply_code",
    "reply_class",
    "created_after",
    "created_before",
)


@_handler
def cmd_dead_letters(args: argparse.Namespace) -> int:
    names = [*_DL_FILTERS, "reviewed", "requeued", "limit", "cursor"]
    flt, page = inputs.dead_letter_query(_pairs(args, names))
    return _out(args, _run(lambda ops, _: ops.dead_letters(flt, page)))


@_handler
def cmd_review(args: argparse.Namespace) -> int:
    delivery_id, actor, reason = inputs.delivery_id(args.delivery_id), _actor(args), _reason(args)
    note = inputs.check(r"^[^\x00]{1,2000}$", args.note, "note", "must be 1-2000 characters")
    return _out(args, _run(lambda ops, _: ops.review(delivery_id, actor, note, reason)))


@_handler
def cmd_bulk_requeue(args: argparse.Namespace) -> int:
    flt = inputs.dead_letter_filter(
        inputs.parse_query(_pairs(args, _DL_FILTERS), inputs.DEAD_LETTER_PARAMS)
    )
    if args.rate is not None and not 0.001 <= args.rate <= 100_000:
        raise errors.InvalidInput("rate: must be from 0.001 to 100000 per second", field="rate")
    if not 1 <= args.limit <= 10_000:
        raise errors.InvalidInput("limit: must be from 1 to 10000", field="limit")
    actor, reason = _actor(args), _reason(args)
    return _out(
        args,
        _run(
            lambda ops, _: ops.bulk_requeue(flt, args.limit, args.rate, actor, reason, args.dry_run)
        ),
    )


@_handler
def cmd_malformed(args: argparse.Namespace) -> int:
    if args.delivery_id is not None:
        return _out(args, console_cmds.malformed_page(args.delivery_id))
    names = ["failure_code", "source", "replayed", "limit", "cursor"]
    flt, page = inputs.malformed_query(_pairs(args, names))
    return _out(args, _run(lambda ops, _: ops.malformed(flt, page)))


@_handler
def cmd_replay(args: argparse.Namespace) -> int:
    from maildaemon.message.policy import command_policy
    from maildaemon.message.render import TemplateCatalog
    from maildaemon.operator import replay
    from maildaemon.store import replicas

    if (args.id is None) == (args.failure_code is None):
        raise errors.InvalidInput(
            "id: give one malformed command id, or --failure-code", field="id"
        )
    malformed_id = inputs.malformed_id(args.id) if args.id is not None else None
    if not 1 <= args.limit <= 1000:
        raise errors.InvalidInput("limit: must be from 1 to 1000", field="limit")
    actor, reason = _actor(args), _reason(args)

    async def work(ops: OperatorStore, s: Settings) -> v.Replay:
        # The catalog on disk now; refused unless every running daemon loaded the same one
        # (and validates with the same settings), so the CLI judges as the daemon will.
        catalog = await asyncio.to_thread(TemplateCatalog.load, s.template_dir, s.default_locale)
        policy, window = command_policy(s, catalog), s.idempotency_window
        live = await replicas.live(ops.pool)
        replay.judge_alike(live, catalog.content_hash, policy.fingerprint(), str(s.template_dir))
        if malformed_id is not None:
            return await replay.replay_one(
                ops, policy, window, malformed_id, actor, reason, args.dry_run
            )
        return await replay.replay_bulk(
            ops,
            policy,
            window,
            args.failure_code,
            args.source,
            args.limit,
            args.dry_run,
            actor,
            reason,
        )

    return _out(args, _run(work))


@_handler
def cmd_command(args: argparse.Namespace) -> int:
    entry_id = inputs.stream_entry_id(args.stream_entry_id)
    trace = _run(lambda ops, _: ops.command_trace(entry_id))
    if trace is None:
        raise errors.NotFound(f"stream entry {entry_id} left no trace")
    return _out(args, trace)


@_handler
def cmd_pause(args: argparse.Namespace) -> int:
    scope, actor, reason = _scope(args), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.pause(scope, actor, reason)))


@_handler
def cmd_resume(args: argparse.Namespace) -> int:
    scope, actor, reason = _scope(args), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.resume(scope, actor, reason)))


def _scope(args: argparse.Namespace) -> str:
    if args.source is None:
        return filters.GLOBAL_SCOPE
    return inputs.check(inputs.SOURCE, args.source, "source", "must be a source name")


@_handler
def cmd_stats(args: argparse.Namespace) -> int:
    return _out(args, _run(lambda ops, _: ops.stats()))


@_handler
def cmd_suppressions(args: argparse.Namespace) -> int:
    flt, page = inputs.suppression_query(_pairs(args, ["address", "domain", "limit", "cursor"]))
    return _out(args, _run(lambda ops, _: ops.suppressions(flt, page)))


@_handler
def cmd_suppress(args: argparse.Namespace) -> int:
    address = inputs.email_address(args.address)
    expires = inputs.parse_time(args.expires_at, "expires_at") if args.expires_at else None
    actor, reason = _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.suppress(address, reason, expires, actor)))


@_handler
def cmd_unsuppress(args: argparse.Namespace) -> int:
    address, actor, reason = inputs.email_address(args.address), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.unsuppress(address, actor, reason)))


@_handler
def cmd_audit(args: argparse.Namespace) -> int:
    flt, page = inputs.action_query(_pairs(args, ["action", "actor", "target", "limit", "cursor"]))
    return _out(args, _run(lambda ops, _: ops.actions(flt, page)))


# --- the parser --------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, *, action: bool = False) -> argparse.ArgumentParser:
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    if action:
        p.add_argument(
            "--actor", help="a note on who acts (the audit records $USER@cli as the actor)"
        )
        p.add_argument("--reason", help="why (kept in the audit trail)")
    return p


def _page_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limit",
        type=int,
        help=f"page size (1-{inputs.MAX_LIMIT}, default {inputs.DEFAULT_LIMIT})",
    )
    p.add_argument("--cursor", help="next page (printed after a full page)")


def _bool_arg(p: argparse.ArgumentParser, name: str, yes: str, no: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        f"--{yes}", dest=name, action="store_const", const=True, help=f"only {yes} ones"
    )
    group.add_argument(f"--{no}", dest=name, action="store_const", const=False, help=f"only {no}")


def _dl_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", help="only this source")
    p.add_argument(
        "--recipient-domain", dest="recipient_domain", help="only with a recipient at this domain"
    )
    p.add_argument("--reply-code", dest="reply_code", help="last SMTP reply code, e.g. 421")
    p.add_argument(
        "--reply-class",
        dest="reply_class",
        choices=["2xx", "3xx", "4xx", "5xx"],
        help="last SMTP reply class",
    )
    p.add_argument("--created-after", dest="created_after", help=_TIME)
    p.add_argument("--created-before", dest="created_before", help=_TIME)


def register(sub: Any) -> None:
    """Add the operator commands to the ``maildaemon`` parser's subcommands."""
    p = sub.add_parser("deliveries", help="look deliveries up, requeue or cancel one")
    d = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = _common(d.add_parser("show", help="one delivery with attempts and retry plan"))
    x.add_argument("delivery_id", help="the command's delivery_id")
    x.set_defaults(handler=cmd_show)
    x = _common(d.add_parser("list", help="deliveries, newest first"))
    x.add_argument("--status", choices=filters.DELIVERY_STATUSES, help="only this status")
    x.add_argument("--source", help="only this source")
    x.add_argument("--recipient", help="only deliveries to this address (to, cc or bcc)")
    x.add_argument("--created-after", dest="created_after", help=_TIME)
    x.add_argument("--created-before", dest="created_before", help=_TIME)
    _page_args(x)
    x.set_defaults(handler=cmd_list)
    for name, handler, text in (
        ("requeue", cmd_requeue, "a dead-lettered or failed delivery back to queued, due now"),
        ("cancel", cmd_cancel, "cancel a queued delivery"),
    ):
        x = _common(d.add_parser(name, help=text), action=True)
        x.add_argument("delivery_id", help="the delivery's id")
        x.add_argument("--dry-run", action="store_true", help="check only; change nothing")
        x.set_defaults(handler=handler)

    p = sub.add_parser("dead-letters", help="list, review or requeue dead letters")
    d = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = _common(d.add_parser("list", help="unreviewed first, then newest first"))
    _dl_filters(x)
    _bool_arg(x, "reviewed", "reviewed", "unreviewed")
    _bool_arg(x, "requeued", "requeued", "not-requeued")
    _page_args(x)
    x.set_defaults(handler=cmd_dead_letters)
    x = _common(d.add_parser("review", help="mark a dead letter reviewed"), action=True)
    x.add_argument("delivery_id", help="the dead letter's delivery id")
    x.add_argument("--note", required=True, help="what was found or done (audit trail)")
    x.set_defaults(handler=cmd_review)
    x = _common(
        d.add_parser("requeue", help="requeue the dead letters matching filters"), action=True
    )
    _dl_filters(x)
    x.add_argument(
        "--dry-run", action="store_true", help="count them and list the first 100; change nothing"
    )
    x.add_argument("--rate", type=float, help="release at most this many per second")
    x.add_argument("--limit", type=int, default=1000, help="at most this many (1-10000)")
    x.set_defaults(handler=cmd_bulk_requeue)

    p = sub.add_parser("malformed", help="list or replay malformed commands")
    d = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = _common(d.add_parser("list", help="refused stream entries, newest first"))
    x.add_argument(
        "--failure-code", dest="failure_code", choices=FAILURE_CODES, help="only this failure"
    )
    x.add_argument("--source", help="only entries naming this source")
    x.add_argument("--delivery-id", help="only entries naming this delivery id (no paging)")
    _bool_arg(x, "replayed", "replayed", "not-replayed")
    _page_args(x)
    x.set_defaults(handler=cmd_malformed)
    x = _common(
        d.add_parser("replay", help="validate again and take in what now passes"), action=True
    )
    x.add_argument("id", nargs="?", help="one malformed command id")
    x.add_argument(
        "--failure-code",
        dest="failure_code",
        choices=FAILURE_CODES,
        help="all unreplayed ones with this failure code",
    )
    x.add_argument("--source", help="only entries naming this source")
    x.add_argument("--limit", type=int, default=100, help="at most this many (1-1000)")
    x.add_argument("--dry-run", action="store_true", help="validate only; change nothing")
    x.set_defaults(handler=cmd_replay)

    p = sub.add_parser("commands", help="what became of a stream entry")
    d = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = _common(d.add_parser("show", help="the delivery, duplicate or malformed record"))
    x.add_argument("stream_entry_id", help="the entry id XADD returned, e.g. 1700000000000-0")
    x.set_defaults(handler=cmd_command)

    p = sub.add_parser("suppressions", help="list, add or remove suppressed addresses")
    d = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    x = _common(d.add_parser("list", help="suppressed addresses"))
    x.add_argument("--address", help="only this address")
    x.add_argument("--domain", help="only addresses at this domain")
    _page_args(x)
    x.set_defaults(handler=cmd_suppressions)
    x = _common(d.add_parser("add", help="suppress an address"), action=True)
    x.add_argument("address", help="the address to suppress")
    x.add_argument("--expires-at", dest="expires_at", help=f"{_TIME} (default: never)")
    x.set_defaults(handler=cmd_suppress)
    x = _common(d.add_parser("remove", help="stop suppressing an address"), action=True)
    x.add_argument("address", help="the address to stop suppressing")
    x.set_defaults(handler=cmd_unsuppress)

    for name, handler, text in (
        ("pause", cmd_pause, "pause sending (intake goes on)"),
        ("resume", cmd_resume, "resume sending"),
    ):
        x = _common(sub.add_parser(name, help=text), action=True)
        x.add_argument("--source", help="only this source (default: all)")
        x.set_defaults(handler=handler)

    x = _common(sub.add_parser("stats", help="the figures an operator checks first"))
    x.set_defaults(handler=cmd_stats)

    x = _common(sub.add_parser("audit", help="operator actions, newest first"))
    x.add_argument("--action", help="only this action, e.g. delivery.requeue")
    x.add_argument("--actor", help="only actions by this actor")
    x.add_argument("--target", help="only actions on this target (delivery id, address, …)")
    _page_args(x)
    x.set_defaults(handler=cmd_audit)
