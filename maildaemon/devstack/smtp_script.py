"""How the dev SMTP server behaves: what it offers, and a script of replies per stage.

A stage is one place in an SMTP session where the server answers: ``banner``, ``ehlo``,
``starttls``, ``auth``, ``mail``, ``rcpt``, ``data`` (the reply to DATA), ``bdat`` (the
reply to BDAT before its chunk is read, as a server refusing it outright does; the link
is then closed), ``end of data`` (the reply to the message: after ``.`` or to
``BDAT … LAST``), ``rset``, ``noop``, ``quit``. Each stage has a FIFO of actions, one
taken per reply; with none left the stage answers normally. An action is:

- a reply line (``"421 4.3.2 busy"``), several lines joined by CRLF (a multiline reply,
  or a reply plus one nobody asked for), or ``bytes`` sent as they are (8-bit, NUL…);
- a reply ending in ``CLOSE``: the reply, then the server closes the link (after reading
  what the client already sent, as a server that gives up on a client does);
- ``DROP``: the link is cut without a reply;
- ``SILENCE``: no reply, ever; the link stays open until the client gives up;
- ``ENDLESS``: a reply line that never ends (written until the client cuts the link);
- ``SKIP``: the command is carried out, but its reply is never sent.

RCPT actions can also be keyed by address (``rcpt_replies``, taken before ``rcpt``).
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field
from email.message import EmailMessage

Action = str | bytes

CLOSE = " +close"  # suffix of a reply: the server closes the link after sending it
DROP = "drop"
SILENCE = "silence"
ENDLESS = "endless"
SKIP = "skip"
STAGES = (
    "banner",
    "ehlo",
    "starttls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "bdat",
    "end of data",
    "rset",
    "noop",
    "quit",
)
SIZE_DEFAULT = 32 * 2**20  # what EHLO offers as SIZE unless told otherwise


@dataclass
class SinkBehaviour:
    """What the server offers and how it answers; change it at any time.

    ``offer_starttls``, ``auth`` and ``size`` apply per connection (from the next one on).
    ``require_starttls`` only applies while STARTTLS is offered. ``auth``: AUTH PLAIN with
    these credentials is required (offered after STARTTLS). ``pipelining`` and
    ``chunking`` (BDAT, RFC 3030) choose what EHLO offers; ``size`` the SIZE limit (RFC
    1870; None: SIZE not offered, no limit). ``close_after_messages``: the server closes a
    connection after every N accepted messages; ``one_transaction``: after every
    transaction (the reply to the message or to RSET), so each message starts a fresh
    session and scripts apply deterministically. ``delays``: seconds waited before the
    reply of a stage (a slow server). ``split_writes``: replies go out three bytes per
    write, each its own TLS record.
    """

    offer_starttls: bool = True
    require_starttls: bool = True
    auth: tuple[str, str] | None = None
    pipelining: bool = False
    chunking: bool = False
    dsn: bool = False  # offer DSN (RFC 3461): RET/ENVID on MAIL, NOTIFY/ORCPT on RCPT taken
    size: int | None = SIZE_DEFAULT
    script: dict[str, list[Action]] = field(default_factory=dict)
    rcpt_replies: dict[str, list[Action]] = field(default_factory=dict)
    close_after_messages: int | None = None
    one_transaction: bool = False
    delays: dict[str, float] = field(default_factory=dict)
    split_writes: bool = False

    def take(self, stage: str, address: str | None = None) -> Action | None:
        """The next scripted action for ``stage`` (for RCPT: of ``address`` first)."""
        if address is not None:
            queue = self.rcpt_replies.get(address) or self.rcpt_replies.get(address.lower())
            if queue:
                return queue.pop(0)
        queue = self.script.get(stage)
        return queue.pop(0) if queue else None

    def clear_script(self) -> None:
        self.script.clear()
        self.rcpt_replies.clear()


def multiline(reply: str, *lines: str) -> str:
    """``reply`` preceded by continuation ``lines`` with its code: one multiline reply."""
    code = reply[:3]
    return "\r\n".join([*(f"{code}-{line}" for line in lines), reply])


def is_reply(action: Action | None, first_digit: str) -> bool:
    """Whether ``action`` is a reply whose code starts with ``first_digit``."""
    if action is None or action in (DROP, SILENCE, ENDLESS, SKIP):
        return False
    text = action if isinstance(action, str) else action.decode("latin-1")
    return text[:1] == first_digit


@dataclass(frozen=True)
class ReceivedMessage:
    """One message the server received, as it came over the wire."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    peer: str
    received_at: float

    def parse(self) -> EmailMessage:
        """The message parsed with the modern ``email`` policy."""
        return email.message_from_bytes(self.data, policy=email.policy.default)


@dataclass(frozen=True)
class Command:
    """One command line the server read (``arg`` None: a line it did not recognise)."""

    verb: str
    arg: str | None
    tls: bool
    at: float  # time.time()
