"""Every test of test_delivery again, with the sink offering PIPELINING: the daemon records
the same outcomes whether the transaction is pipelined or one command at a time."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from maildaemon.devstack.smtp_sink import SinkBehaviour, SmtpSink
from tests.integration import test_delivery

globals().update({k: v for k, v in vars(test_delivery).items() if k.startswith("test_")})


@pytest.fixture
async def smtp_sink(tmp_path: Path, smtp_ca: trustme.CA) -> AsyncIterator[SmtpSink]:
    sink = SmtpSink(tmp_path / "sink-maildir", behaviour=SinkBehaviour(pipelining=True), ca=smtp_ca)
    await sink.start()
    try:
        yield sink
    finally:
        await sink.stop()
