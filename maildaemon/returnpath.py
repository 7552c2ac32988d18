"""The signed return path: a token that maps a report back to exactly one delivery.

Each delivery's envelope sender is ``<local>+<token>@<MAIL_BOUNCE_DOMAIN>`` and each message
carries the same token in ``X-Maildaemon-Ref``. The token is 32 base32 characters: a
10-byte reference (the first bytes of SHA-256 over the delivery id, looked up in
``mail.delivery_refs``) and a 10-byte HMAC-SHA256 over that reference with
``MAIL_BOUNCE_SECRET``. A token is checked (constant-time) before anything is looked up, so
a forged one never reaches a delivery; base32 survives a relay that folds the local part's
case. ``bounces+`` and the token are 40 octets, within RFC 5321's 64-octet local part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass
from typing import Literal

from maildaemon.config_bounces import BounceSettings

HEADER = "X-Maildaemon-Ref"
_REF_BYTES = 10
_MAC_BYTES = 10
_TOKEN_CHARS = 32
_TOKEN = re.compile(r"[a-z2-7]{32}")
_LABEL = b"maildaemon-return-path-v1\0"


def delivery_ref(delivery_id: str) -> bytes:
    """The reference a token carries for a delivery (as ``mail.delivery_refs`` holds it)."""
    return hashlib.sha256(delivery_id.encode("utf-8")).digest()[:_REF_BYTES]


@dataclass(frozen=True, slots=True)
class TokenCheck:
    """What one token candidate turned out to be: a valid reference, or a bad token."""

    status: Literal["valid", "bad_token"]
    token: str
    ref: bytes | None = None


class ReturnPath:
    """Makes and checks the tokens of one bounce domain and secret."""

    def __init__(self, domain: str, secret: str, local_part: str = "bounces") -> None:
        self.domain = domain.lower()
        self.local_part = local_part
        self._key = secret.encode("utf-8")

    def _mac(self, ref: bytes) -> bytes:
        return hmac.new(self._key, _LABEL + ref, hashlib.sha256).digest()[:_MAC_BYTES]

    def token(self, delivery_id: str) -> str:
        ref = delivery_ref(delivery_id)
        return base64.b32encode(ref + self._mac(ref)).decode("ascii").lower()

    def sender(self, delivery_id: str) -> str:
        """The envelope sender (MAIL FROM) of a delivery."""
        return f"{self.local_part}+{self.token(delivery_id)}@{self.domain}"

    def owns(self, address: str) -> bool:
        """Whether ``address`` is one of this bounce domain's addresses (a report may go there)."""
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            return False
        base = local.lower().partition("+")[0]
        return base == self.local_part

    def check(self, token: str) -> TokenCheck:
        """A token's reference if its signature holds; ``bad_token`` otherwise."""
        text = token.strip().lower()
        if not _TOKEN.fullmatch(text):
            return TokenCheck("bad_token", text[:64])
        try:
            raw = base64.b32decode(text.upper())
        except (binascii.Error, ValueError):
            return TokenCheck("bad_token", text)
        ref, mac = raw[:_REF_BYTES], raw[_REF_BYTES:]
        if not hmac.compare_digest(mac, self._mac(ref)):
            return TokenCheck("bad_token", text)
        return TokenCheck("valid", text, ref)

    def token_in_address(self, address: str) -> str | None:
        """The token part of one of this domain's addresses (``bounces+<token>@domain``);
        None for any other address (or one of ours without a token)."""
        if not self.owns(address):
            return None
        local = address.strip().strip("<>").rpartition("@")[0]
        _, plus, token = local.partition("+")
        return token if plus and token else None


def token_like(text: str) -> str | None:
    """A header value that may be a token (``X-Maildaemon-Ref``), trimmed; None if empty."""
    value = text.strip().strip("<>").strip()
    return value[: _TOKEN_CHARS * 2] or None


def xtext(value: str) -> str:
    """RFC 3461 xtext: printable ASCII but ``+`` and ``=`` as itself, the rest ``+HH``."""
    out = []
    for byte in value.encode("utf-8"):
        if 33 <= byte <= 126 and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def from_settings(settings: BounceSettings) -> ReturnPath | None:
    """The return path the settings configure (``MAIL_BOUNCE_DOMAIN`` and secret), or None."""
    if not settings.bounce_domain or settings.bounce_secret is None:
        return None
    return ReturnPath(
        settings.bounce_domain,
        settings.bounce_secret.get_secret_value(),
        settings.bounce_local_part,
    )
