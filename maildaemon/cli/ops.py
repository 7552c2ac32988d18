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
from maildaemon.cli.declare import Commands, arg, either, operator_options, page_args
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


# --- declarations ------------------------------------------------------------------------


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


_GROUPS = {
    "deliveries": "look deliveries up, requeue or cancel one",
    "dead-letters": "list, review or requeue dead letters",
    "malformed": "list or replay malformed commands",
    "commands": "what became of a stream entry",
    "suppressions": "list, add or remove suppressed addresses",
}
command = Commands(_GROUPS, operator_options)
_ONE_DELIVERY = (
    arg("delivery_id", help="the delivery's id"),
    arg("--dry-run", action="store_true", help="check only; change nothing"),
)
_SCOPE = (arg("--source", help="only this source (default: all)"),)


def register(sub: Any) -> None:
    """Add the operator commands to the ``maildaemon`` parser's subcommands."""
    command.install(sub)


# --- commands ----------------------------------------------------------------------------


@command(
    "deliveries show",
    "one delivery with attempts and retry plan",
    arg("delivery_id", help="the command's delivery_id"),
)
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


@command(
    "deliveries list",
    "deliveries, newest first",
    arg("--status", choices=filters.DELIVERY_STATUSES, help="only this status"),
    arg("--source", help="only this source"),
    arg("--recipient", help="only deliveries to this address (to, cc or bcc)"),
    arg("--created-after", dest="created_after", help=_TIME),
    arg("--created-before", dest="created_before", help=_TIME),
    page_args,
)
@_handler
def cmd_list(args: argparse.Namespace) -> int:
    flt, page = inputs.delivery_query(_pairs(args, [p.name for p in inputs.DELIVERY_PARAMS]))
    return _out(args, _run(lambda ops, _: ops.deliveries(flt, page)))


@command(
    "deliveries requeue",
    "a dead-lettered or failed delivery back to queued, due now",
    *_ONE_DELIVERY,
    action=True,
)
@_handler
def cmd_requeue(args: argparse.Namespace) -> int:
    delivery_id, actor, reason = inputs.delivery_id(args.delivery_id), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.requeue(delivery_id, actor, reason, args.dry_run)))


@command("deliveries cancel", "cancel a queued delivery", *_ONE_DELIVERY, action=True)
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


@command(
    "dead-letters list",
    "unreviewed first, then newest first",
    _dl_filters,
    either("reviewed", "reviewed", "unreviewed"),
    either("requeued", "requeued", "not-requeued"),
    page_args,
)
@_handler
def cmd_dead_letters(args: argparse.Namespace) -> int:
    names = [*_DL_FILTERS, "reviewed", "requeued", "limit", "cursor"]
    flt, page = inputs.dead_letter_query(_pairs(args, names))
    return _out(args, _run(lambda ops, _: ops.dead_letters(flt, page)))


@command(
    "dead-letters review",
    "mark a dead letter reviewed",
    arg("delivery_id", help="the dead letter's delivery id"),
    arg("--note", required=True, help="what was found or done (audit trail)"),
    action=True,
)
@_handler
def cmd_review(args: argparse.Namespace) -> int:
    delivery_id, actor, reason = inputs.delivery_id(args.delivery_id), _actor(args), _reason(args)
    note = inputs.check(r"^[^\x00]{1,2000}$", args.note, "note", "must be 1-2000 characters")
    return _out(args, _run(lambda ops, _: ops.review(delivery_id, actor, note, reason)))


@command(
    "dead-letters requeue",
    "requeue the dead letters matching filters",
    _dl_filters,
    arg("--dry-run", action="store_true", help="count them and list the first 100; change nothing"),
    arg("--rate", type=float, help="release at most this many per second"),
    arg("--limit", type=int, default=1000, help="at most this many (1-10000)"),
    action=True,
)
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


@command(
    "malformed list",
    "refused stream entries, newest first",
    arg("--failure-code", dest="failure_code", choices=FAILURE_CODES, help="only this failure"),
    arg("--source", help="only entries naming this source"),
    arg("--delivery-id", help="only entries naming this delivery id (no paging)"),
    either("replayed", "replayed", "not-replayed"),
    page_args,
)
@_handler
def cmd_malformed(args: argparse.Namespace) -> int:
    if args.delivery_id is not None:
        return _out(args, console_cmds.malformed_page(args.delivery_id))
    names = ["failure_code", "source", "replayed", "limit", "cursor"]
    flt, page = inputs.malformed_query(_pairs(args, names))
    return _out(args, _run(lambda ops, _: ops.malformed(flt, page)))


@command(
    "malformed replay",
    "validate again and take in what now passes",
    arg("id", nargs="?", help="one malformed command id"),
    arg(
        "--failure-code",
        dest="failure_code",
        choices=FAILURE_CODES,
        help="all unreplayed ones with this failure code",
    ),
    arg("--source", help="only entries naming this source"),
    arg("--limit", type=int, default=100, help="at most this many (1-1000)"),
    arg("--dry-run", action="store_true", help="validate only; change nothing"),
    action=True,
)
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


@command(
    "commands show",
    "the delivery, duplicate or malformed record",
    arg("stream_entry_id", help="the entry id XADD returned, e.g. 1700000000000-0"),
)
@_handler
def cmd_command(args: argparse.Namespace) -> int:
    entry_id = inputs.stream_entry_id(args.stream_entry_id)
    trace = _run(lambda ops, _: ops.command_trace(entry_id))
    if trace is None:
        raise errors.NotFound(f"stream entry {entry_id} left no trace")
    return _out(args, trace)


@command("pause", "pause sending (intake goes on)", *_SCOPE, action=True)
@_handler
def cmd_pause(args: argparse.Namespace) -> int:
    scope, actor, reason = _scope(args), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.pause(scope, actor, reason)))


@command("resume", "resume sending", *_SCOPE, action=True)
@_handler
def cmd_resume(args: argparse.Namespace) -> int:
    scope, actor, reason = _scope(args), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.resume(scope, actor, reason)))


def _scope(args: argparse.Namespace) -> str:
    if args.source is None:
        return filters.GLOBAL_SCOPE
    return inputs.check(inputs.SOURCE, args.source, "source", "must be a source name")


@command("stats", "the figures an operator checks first")
@_handler
def cmd_stats(args: argparse.Namespace) -> int:
    return _out(args, _run(lambda ops, _: ops.stats()))


@command(
    "suppressions list",
    "suppressed addresses",
    arg("--address", help="only this address"),
    arg("--domain", help="only addresses at this domain"),
    page_args,
)
@_handler
def cmd_suppressions(args: argparse.Namespace) -> int:
    flt, page = inputs.suppression_query(_pairs(args, ["address", "domain", "limit", "cursor"]))
    return _out(args, _run(lambda ops, _: ops.suppressions(flt, page)))


@command(
    "suppressions add",
    "suppress an address",
    arg("address", help="the address to suppress"),
    arg("--expires-at", dest="expires_at", help=f"{_TIME} (default: never)"),
    action=True,
)
@_handler
def cmd_suppress(args: argparse.Namespace) -> int:
    address = inputs.email_address(args.address)
    expires = inputs.parse_time(args.expires_at, "expires_at") if args.expires_at else None
    actor, reason = _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.suppress(address, reason, expires, actor)))


@command(
    "suppressions remove",
    "stop suppressing an address",
    arg("address", help="the address to stop suppressing"),
    action=True,
)
@_handler
def cmd_unsuppress(args: argparse.Namespace) -> int:
    address, actor, reason = inputs.email_address(args.address), _actor(args), _reason(args)
    return _out(args, _run(lambda ops, _: ops.unsuppress(address, actor, reason)))


@command(
    "audit",
    "operator actions, newest first",
    arg("--action", help="only this action, e.g. delivery.requeue"),
    arg("--actor", help="only actions by this actor"),
    arg("--target", help="only actions on this target (delivery id, address, …)"),
    page_args,
)
@_handler
def cmd_audit(args: argparse.Namespace) -> int:
    flt, page = inputs.action_query(_pairs(args, ["action", "actor", "target", "limit", "cursor"]))
    return _out(args, _run(lambda ops, _: ops.actions(flt, page)))


# --- the parser --------------------------------------------------------------------------
