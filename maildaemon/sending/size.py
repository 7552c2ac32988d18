"""RFC 1870 SIZE: the limit a server advertises in EHLO, the ``SIZE=`` parameter on MAIL
FROM, and the local refusal of a message the server has said it will not take."""

from __future__ import annotations

from collections.abc import Mapping

from maildaemon.errors import MessageTooLarge


def advertised_limit(extensions: Mapping[str, str]) -> int | None:
    """The server's ``SIZE`` (EHLO keywords lower-cased, as aiosmtplib keeps them): ``None``
    when SIZE is not offered, ``0`` when offered without a fixed limit (RFC 1870 §4)."""
    if "size" not in extensions:
        return None
    value = extensions["size"].strip()
    return int(value) if value.isdigit() else 0


def mail_parameter(message: bytes, limit: int | None) -> bytes:
    """`` SIZE=<octets>`` for MAIL FROM when the server offers SIZE; refuses a message
    larger than its fixed limit before any of it is sent."""
    if limit is None:
        return b""
    if limit and len(message) > limit:
        raise MessageTooLarge(len(message), limit)
    return b" SIZE=%d" % len(message)
