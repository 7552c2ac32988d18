"""Per-command declarations: each command states its name, help and arguments beside its
handler (``@commands("deliveries show", "…", arg("delivery_id"))``), and ``install`` adds
them to argparse in the order they were declared.

argparse stays (the CLI has no other dependency and its help output is what the README
shows); what click would bring here (declarations beside the code) is this short module.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from maildaemon.operator import inputs

Handler = Callable[[argparse.Namespace], int]
Arg = Callable[[argparse.ArgumentParser], object]


def arg(*flags: str, **options: Any) -> Arg:
    """One ``add_argument`` call, declared now and made when the parser is built."""
    return lambda parser: parser.add_argument(*flags, **options)


@dataclass(frozen=True, slots=True)
class _Command:
    path: tuple[str, ...]  # ("deliveries", "show") or ("stats",)
    help: str
    args: tuple[Arg, ...]
    action: bool  # a change: --actor and --reason, kept in the audit trail
    handler: Handler


class Commands:
    """A set of declared commands, under groups (``deliveries``, …) that have their own
    help; ``common`` adds what every command of the set takes."""

    def __init__(
        self,
        groups: dict[str, str],
        common: Callable[[argparse.ArgumentParser, bool], object],
    ) -> None:
        self._groups = groups
        self._common = common
        self._declared: list[_Command] = []

    def __call__(
        self, path: str, help: str, *args: Arg, action: bool = False
    ) -> Callable[[Handler], Handler]:
        def declare(handler: Handler) -> Handler:
            names = tuple(path.split())
            assert len(names) == 1 or names[0] in self._groups, f"no group {names[0]!r}"
            self._declared.append(_Command(names, help, args, action, handler))
            return handler

        return declare

    def install(self, sub: Any) -> None:
        """Add every declared command to the ``maildaemon`` parser's subcommands."""
        actions: dict[str, Any] = {}
        for command in self._declared:
            parent = sub
            if len(command.path) == 2:
                group = command.path[0]
                if group not in actions:
                    p = sub.add_parser(group, help=self._groups[group])
                    actions[group] = p.add_subparsers(
                        dest="action", required=True, metavar="ACTION"
                    )
                parent = actions[group]
            parser = parent.add_parser(command.path[-1], help=command.help)
            self._common(parser, command.action)
            for add in command.args:
                add(parser)
            parser.set_defaults(handler=command.handler)


def operator_options(p: argparse.ArgumentParser, action: bool) -> None:
    """What every operator command takes: --json; a change also --actor and --reason."""
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    if action:
        p.add_argument(
            "--actor", help="a note on who acts (the audit records $USER@cli as the actor)"
        )
        p.add_argument("--reason", help="why (kept in the audit trail)")


def page_args(p: argparse.ArgumentParser) -> None:
    """Keyset paging: --limit and --cursor."""
    p.add_argument(
        "--limit",
        type=int,
        help=f"page size (1-{inputs.MAX_LIMIT}, default {inputs.DEFAULT_LIMIT})",
    )
    p.add_argument("--cursor", help="next page (printed after a full page)")


def either(name: str, yes: str, no: str) -> Arg:
    """A --yes / --no pair setting ``name`` True or False (neither: both kinds)."""

    def add(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group()
        group.add_argument(
            f"--{yes}", dest=name, action="store_const", const=True, help=f"only {yes} ones"
        )
        group.add_argument(
            f"--{no}", dest=name, action="store_const", const=False, help=f"only {no}"
        )

    return add
