"""The dev inbox: the ``.eml`` files the development SMTP sink keeps, listed and read.

Only ``maildaemon dev`` gives the HTTP app a maildir. A message is named by its file name,
checked against a strict pattern and resolved inside the maildir, so a request can never
read another file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email import policy
from email.parser import BytesHeaderParser
from pathlib import Path

from maildaemon.errors import InvalidInput, NotFound
from maildaemon.operator.mailview import header_text

NAME = r"^[0-9A-Za-z][0-9A-Za-z._-]{0,199}\.eml$"
_NAME = re.compile(NAME.removeprefix("^").removesuffix("$"))
_HEAD_BYTES = 64 * 1024
MAX_LIMIT = 500


@dataclass(frozen=True, slots=True)
class InboxItem:
    name: str
    received_at: datetime
    size: int
    subject: str | None
    sender: str | None
    to: str | None


@dataclass(frozen=True, slots=True)
class InboxPage:
    maildir: str  # the maildir's folder name (never its path)
    total: int
    items: list[InboxItem]  # newest first


def message_path(maildir: Path, name: str) -> Path:
    if not _NAME.fullmatch(name):
        raise InvalidInput("name: not a caught message's file name (*.eml)", field="name")
    path = (maildir / name).resolve()
    if path.parent != maildir.resolve() or not path.is_file():
        raise NotFound(f"no caught message {name!r}", field="name")
    return path


def read_message(maildir: Path, name: str) -> bytes:
    try:
        return message_path(maildir, name).read_bytes()
    except FileNotFoundError:  # removed between the check and the read
        raise NotFound(f"no caught message {name!r}", field="name") from None


def listing(maildir: Path, limit: int) -> InboxPage:
    """The newest ``limit`` caught messages, with their subject, sender and recipients."""
    entries: list[tuple[float, int, Path]] = []
    if maildir.is_dir():
        for path in maildir.iterdir():
            if not _NAME.fullmatch(path.name):
                continue
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, path))
    entries.sort(key=lambda e: (e[0], e[2].name), reverse=True)
    items = [_item(path, mtime, size) for mtime, size, path in entries[:limit]]
    # The folder's name only: an absolute path tells a reader about the host.
    return InboxPage(maildir.name, len(entries), [i for i in items if i is not None])


def _item(path: Path, mtime: float, size: int) -> InboxItem | None:
    try:
        with path.open("rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except FileNotFoundError:
        return None
    headers = BytesHeaderParser(policy=policy.default).parsebytes(head)
    return InboxItem(
        name=path.name,
        received_at=datetime.fromtimestamp(mtime, UTC),
        size=size,
        subject=header_text(headers, "Subject"),
        sender=header_text(headers, "From"),
        to=header_text(headers, "To"),
    )
