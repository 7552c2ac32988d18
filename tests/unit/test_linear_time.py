"""Nothing derived from producer input takes more than linear time: pathological inputs,
time-boxed, and growth measured (4x the input must cost well under 16x the time)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from maildaemon.addresses import AddressError, canonical_address
from maildaemon.config import Settings
from maildaemon.contract import limits
from maildaemon.contract.command import DeliveryCommand
from maildaemon.contract.parsing import parse_command
from maildaemon.message.mime import Mailbox, build_message
from maildaemon.message.policy import command_policy
from maildaemon.message.render import TemplateCatalog, _one_line

CATALOG = TemplateCatalog.load(Path(__file__).resolve().parents[2] / "templates", "en")
POLICY = command_policy(
    Settings(postgres_primary_dsn="postgresql://x@127.0.0.1/x", smtp_mode="stub"), CATALOG
)


def best_of(work: Callable[[], object], runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def assert_linear(make: Callable[[int], Callable[[], object]], n: int) -> None:
    small, large = best_of(make(n)), best_of(make(4 * n))
    assert large < max(8 * small, 0.02), (small, large)  # quadratic would be ~16x


def test_subject_line_breaks_are_linear() -> None:
    """The reported case: 16,000 spaces took ~1.5 s in the old regex, 4x per doubling."""
    for subject in (" " * 1_000_000 + "x", "a" + " " * 1_000_000 + "\n b", "\n \t" * 300_000):
        assert best_of(lambda s=subject: _one_line(s), runs=1) < 0.5
    assert _one_line("  Hello \r\n  world \u2028 again  ") == "Hello world again"
    assert _one_line("a  b") == "a  b"
    assert_linear(lambda n: lambda: _one_line("x" + " " * n + "y"), 200_000)


def _command(**fields: object) -> str:
    doc: dict[str, object] = {
        "delivery_id": "d-1",
        "source": "notification",
        "idempotency_key": "k-1",
        "to": ["ada@example.com"],
        "payload_mode": "template",
        "template_id": "notification",
        "variables": {"title": "t", "body": "b"},
    }
    doc.update(fields)
    return json.dumps(doc)


def test_largest_accepted_commands_validate_quickly() -> None:
    wide = {f"v{i}": [str(i)] * 70 for i in range(limits.VARIABLES_MAX_COUNT - 2)}
    deep: object = "x"
    for _ in range(limits.VARIABLES_MAX_DEPTH):
        deep = [deep]
    cases = [
        _command(variables={"title": " " * 200_000, "body": "\n" * 50_000}),
        _command(variables={"title": "t", "body": "b", **wide}),
        _command(variables={"title": "t", "body": "b", "d": deep}),
        _command(to=[f"{'a' * 60}.{i}@{'b' * 60}.{'c' * 60}.example" for i in range(100)]),
        _command(to=[f"x{i}@{'ü' * 50}.{'ß' * 50}.de" for i in range(100)]),
    ]
    for raw in cases:
        assert isinstance(parse_command(raw, POLICY), DeliveryCommand)
        assert best_of(lambda r=raw: parse_command(r, POLICY), runs=1) < 1.0
    refused = [
        _command(variables={"title": "t", "body": "b", "x": " " * (limits.VARIABLES_MAX_CHARS)}),
        _command(variables={"title": "t", "body": "b", "x": list(range(100_000))}),
        '{"variables": ' + "[" * 900 + "]" * 900 + "}",
    ]
    for raw in refused:
        assert best_of(lambda r=raw: parse_command(r, POLICY), runs=1) < 1.0
    assert_linear(
        lambda n: (
            lambda: parse_command(
                _command(
                    subject=None, to=["a@b.example"] * 1, variables={"title": "t", "body": " " * n}
                ),
                POLICY,
            )
        ),
        50_000,
    )


def test_hostile_addresses_are_decided_quickly() -> None:
    hostile = [
        "a" * 64 + "@" + "-" * 189,
        "a@" + "a." * 125 + "a",
        "a@" + "xn--" * 62 + ".de",
        "a@" + "\u0300" * 250,
        ".".join(["a"] * 32) + "@" + "b" * 63 + "." + "c" * 63,
    ]
    for address in hostile:
        started = time.perf_counter()
        with contextlib.suppress(AddressError):
            canonical_address(address)
        assert time.perf_counter() - started < 0.05, address


def test_header_folding_is_linear() -> None:
    def build(value: str) -> bytes:
        return build_message(
            sender="a@b.example",
            to=[Mailbox("c@d.example", "x " * 100)],
            cc=[],
            reply_to=None,
            subject="s " * 499,
            text="t",
            html=None,
            headers={"List-Id": value},
            attachments=[],
            message_id="<m@b.example>",
            date=datetime(2030, 1, 1, tzinfo=UTC),
        )

    for value in ("a " * 497, "a" * 985, " " * 985, "ü " * 400):
        assert best_of(lambda v=value: build(v), runs=1) < 0.05
