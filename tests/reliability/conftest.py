"""The reliability suite's scripted server: the dev SMTP server, one transaction per
connection, so each message starts a fresh session and a script applies to it alone."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trustme

from maildaemon.devstack.smtp_sink import SinkBehaviour, SmtpSink


def scripted_server(ca: trustme.CA) -> SmtpSink:
    """STARTTLS required, PIPELINING (tests add CHUNKING, SIZE, AUTH), no SIZE limit."""
    behaviour = SinkBehaviour(pipelining=True, size=None, one_transaction=True)
    return SmtpSink(behaviour=behaviour, ca=ca)


@pytest.fixture
async def scripted(smtp_ca: trustme.CA) -> AsyncIterator[SmtpSink]:
    server = scripted_server(smtp_ca)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
