"""What an SMTP server answered: one reply, and the report of one message's transaction."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    text: str


@dataclass(slots=True)
class SendReport:
    """What the server answered for one message."""

    accepted: dict[str, Reply] = field(default_factory=dict)
    refused: dict[str, Reply] = field(default_factory=dict)  # 5xx at RCPT
    deferred: dict[str, Reply] = field(default_factory=dict)  # 4xx at RCPT
    data_reply: Reply | None = None  # the reply to the end of DATA, when sent
    data_refused: Reply | None = None  # DATA refused (4xx/5xx): nobody got it
    duration_ms: float = 0.0
