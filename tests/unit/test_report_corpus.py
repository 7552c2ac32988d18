"""Other MTAs' and providers' reports (tests/reports), each read for what it is: its kind,
the recipient it names with the status it gives, and the token that ties it to the one
delivery it is about, found in the envelope, the returned headers or the DSN's ENVID."""

from __future__ import annotations

import pytest

from maildaemon.reports.parse import parse
from maildaemon.returnpath import HEADER, ReturnPath
from tests.reports import EXPECTED, report

RP = ReturnPath("bounce.example", "corpus-secret-0123456789abcdef")
RECIPIENT = "dana@mail.example.org"


def aimed(name: str, delivery_id: str = "corpus-1") -> bytes:
    token = RP.token(delivery_id)
    return report(
        name,
        bounce_address=RP.sender(delivery_id),
        token=token,
        recipient=RECIPIENT,
        message_id=f"<{delivery_id}@example.com>",
        ref_header=f"{HEADER}: {token}",
    )


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_report_is_read_for_what_it_is(name: str) -> None:
    expected = EXPECTED[name]
    parsed = parse(aimed(name), (RP.sender("corpus-1"),), RP)
    assert parsed.unparseable is None
    assert parsed.kind == expected.kind, parsed
    assert RP.token("corpus-1") in parsed.tokens, parsed
    assert not parsed.loop
    if expected.kind in ("bounce", "delay") or (
        expected.kind == "complaint" and expected.names_recipient
    ):
        assert RECIPIENT in {r.address.lower() for r in parsed.recipients}, parsed
    if expected.status is not None:
        [mine] = [r for r in parsed.recipients if r.address.lower() == RECIPIENT]
        assert mine.status == expected.status, parsed


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_a_report_about_another_delivery_carries_only_that_token(name: str) -> None:
    parsed = parse(aimed(name, "corpus-2"), (RP.sender("corpus-2"),), RP)
    assert RP.token("corpus-1") not in parsed.tokens
    assert RP.token("corpus-2") in parsed.tokens
