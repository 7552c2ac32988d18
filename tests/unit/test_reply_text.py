"""Reply text from a server is stored as it came where it can be, escaped where it cannot:
no lone surrogate, no NUL, no control character but tab and newline, bounded length."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maildaemon.errors import MessageTooLarge
from maildaemon.sending.reply import MAX_REPLY_TEXT, Reply, storable_text
from maildaemon.sending.session import OutOfStep, ReplyReader
from maildaemon.sending.size import advertised_limit, mail_parameter
from tests.unit.test_reply_reader import _Transport


def assert_storable(text: str) -> None:
    text.encode("utf-8")  # strict: raises on a lone surrogate
    assert "\x00" not in text
    assert all(c in "\t\n" or not (ord(c) < 0x20 or ord(c) == 0x7F) for c in text)
    assert len(text) <= MAX_REPLY_TEXT
    json.loads(json.dumps(text))


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"5.1.1 Empf\xe4nger unbekannt", "5.1.1 Empf\\xe4nger unbekannt"),
        ("5.1.1 Empf\udce4nger unbekannt", "5.1.1 Empf\\xe4nger unbekannt"),  # aiosmtplib's
        ("5.1.1 Empfänger unbekannt".encode(), "5.1.1 Empfänger unbekannt"),
        ("5.1.1 Empfänger unbekannt", "5.1.1 Empfänger unbekannt"),
        (b"a\x00b\x1bc\rd\x7fe\tf", "a\\x00b\\x1bc\\x0dd\\x7fe\tf"),
        (b"\xc3(", "\\xc3("),  # a UTF-8 lead byte without its continuation
        (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),  # an encoded surrogate is not valid UTF-8
        ("one\ntwo", "one\ntwo"),  # the lines of a multi-line reply
        ("\ud800 lone", "\\ud800 lone"),  # a surrogate no decoder made from a byte
    ],
)
def test_text_is_kept_or_escaped(raw: bytes | str, text: str) -> None:
    assert storable_text(raw) == text
    assert_storable(storable_text(raw))


def test_overlong_text_is_cut_and_says_so() -> None:
    text = storable_text(b"x" * 100_000)
    assert len(text) <= MAX_REPLY_TEXT and text.endswith("[100000 characters, cut]")
    assert storable_text(text) == text
    escaped = storable_text(b"\x00" * 10_000)  # escaping grows it fourfold: still bounded
    assert len(escaped) <= MAX_REPLY_TEXT and escaped.startswith("\\x00\\x00")


@given(st.binary(max_size=6000))
def test_any_bytes_become_storable_text_idempotently(raw: bytes) -> None:
    text = storable_text(raw)
    assert_storable(text)
    assert storable_text(text) == text
    assert storable_text(raw.decode("utf-8", "surrogateescape")) == text


@given(st.text(max_size=2000).filter(lambda t: t.isprintable()))
def test_printable_unicode_is_kept(text: str) -> None:
    assert storable_text(text) == text
    assert storable_text(text.encode()) == text


def test_every_reply_is_storable_however_it_was_made() -> None:
    assert Reply(550, "Empf\udce4nger\x00").text == "Empf\\xe4nger\\x00"


async def test_the_pipelined_reader_decodes_lines_into_storable_text() -> None:
    reader = ReplyReader(_Transport())
    reader.data_received(b"550-Empf\xe4nger\r\n550-nul \x00 here\r\n550 5.1.1 \xff\xfe\r\n")
    reply = await asyncio.wait_for(reader.reply(), 1)
    assert reply == Reply(550, "Empf\\xe4nger\nnul \\x00 here\n5.1.1 \\xff\\xfe")


@pytest.mark.parametrize(
    ("extensions", "limit"),
    [({}, None), ({"size": ""}, 0), ({"size": "10240000"}, 10240000), ({"size": "x"}, 0)],
)
def test_advertised_size(extensions: dict[str, str], limit: int | None) -> None:
    assert advertised_limit(extensions) == limit


def test_size_parameter_and_local_refusal() -> None:
    assert mail_parameter(b"x" * 10, None) == b""
    assert mail_parameter(b"x" * 10, 0) == b" SIZE=10"
    assert mail_parameter(b"x" * 10, 10) == b" SIZE=10"
    with pytest.raises(MessageTooLarge) as info:
        mail_parameter(b"x" * 11, 10)
    assert (info.value.size, info.value.limit) == (11, 10)
    assert "message_too_large" in str(info.value) and "11" in str(info.value)
    assert info.value.permanent


async def test_the_reader_bounds_a_reply_of_endless_continuation_lines() -> None:
    transport = _Transport()
    reader = ReplyReader(transport)
    line = b"250-" + b"x" * 1000 + b"\r\n"
    fed = 0
    while not transport.aborted and fed < 10 * 2**20:
        reader.data_received(line)
        fed += len(line)
    assert transport.aborted and fed < 64 * 1024  # cut within about MAX_REPLY
    with pytest.raises(OutOfStep):
        await reader.reply()
