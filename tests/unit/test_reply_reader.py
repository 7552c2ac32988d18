"""ReplyReader: SMTP replies parsed from whatever segments they arrive in, in order."""

from __future__ import annotations

import asyncio

import pytest

from maildaemon.sending.reply import Reply
from maildaemon.sending.session import LinkLost, OutOfStep, ReplyReader


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


async def test_replies_split_anywhere_and_multiline() -> None:
    reader = ReplyReader(_Transport())
    wire = b"250 2.1.0 ok\r\n250-one\r\n250-two\r\n250 three\r\n354 go\r\n"
    for i in range(len(wire)):
        reader.data_received(wire[i : i + 1])
    assert [await reader.reply() for _ in range(3)] == [
        Reply(250, "2.1.0 ok"),
        Reply(250, "one\ntwo\nthree"),
        Reply(354, "go"),
    ]
    assert reader.idle


async def test_reply_waits_for_data_then_fails_on_eof() -> None:
    reader = ReplyReader(_Transport())
    waiting = asyncio.ensure_future(reader.reply())
    await asyncio.sleep(0)
    reader.data_received(b"421 4.4.2 bye\r\n")
    assert await waiting == Reply(421, "4.4.2 bye")
    reader.eof_received()
    with pytest.raises(LinkLost):
        await reader.reply()


@pytest.mark.parametrize(
    "wire",
    [b"hello there\r\n", b"250-one\r\n550 two\r\n", b"999 nine\r\n", b"2" * 9000],
)
async def test_not_smtp_is_out_of_step_and_cuts_the_link(wire: bytes) -> None:
    transport = _Transport()
    reader = ReplyReader(transport)
    reader.data_received(wire)
    with pytest.raises(OutOfStep):
        await reader.reply()
    assert transport.aborted
