"""The one canonical form of an e-mail address, decided once at intake.

``local@domain`` where the local part is an ASCII dot-atom kept as given, and the domain is
its IDNA 2008 ASCII form after UTS #46 mapping (the ``idna`` package, transitional
processing off): lower-case LDH labels (letters, digits, hyphens), ``xn--`` for Unicode
labels. ``Straße.DE`` becomes ``xn--strae-oqa.de`` -- not ``strasse.de``, which Python's
built-in IDNA 2003 codec would produce and which is another domain.

The SMTP envelope, the message headers, the suppression list, rate-limit keys and operator
searches all use this form, so two spellings of one mailbox (domain case, Unicode or
punycode domain) are one address everywhere.
"""

from __future__ import annotations

import re

import idna

MAX_ADDRESS = 254
MAX_LOCAL = 64
MAX_DOMAIN = 253

_LOCAL = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


class AddressError(ValueError):
    """An address with no canonical form (the message says why)."""


def canonical_domain(domain: str) -> str:
    """The domain as lower-case LDH labels (IDNA 2008 / UTS #46); AddressError otherwise."""
    if domain.isascii():
        lowered = domain.lower()
        labels = lowered.split(".")
        if (
            len(lowered) <= MAX_DOMAIN
            and len(labels) >= 2
            and all(_LDH_LABEL.fullmatch(label) and label[2:4] != "--" for label in labels)
        ):
            return lowered  # plain LDH labels (no A-labels to verify): already canonical
    if not domain or len(domain) > MAX_DOMAIN * 4:
        raise AddressError(f"not a mail domain: {domain[:100]!r}")
    try:
        ascii_form = idna.encode(domain, uts46=True, transitional=False, std3_rules=True)
    except (idna.IDNAError, UnicodeError, ValueError) as exc:
        raise AddressError(f"domain {domain[:100]!r} does not map to IDNA 2008: {exc}") from None
    text = ascii_form.decode("ascii").lower()
    labels = text.split(".")
    if (
        len(text) > MAX_DOMAIN
        or len(labels) < 2
        or not all(_LDH_LABEL.fullmatch(label) for label in labels)
    ):
        raise AddressError(f"not a mail domain: {domain[:100]!r}")
    return text


def canonical_address(address: str) -> str:
    """``local@domain`` in canonical form; AddressError if the address has none."""
    local, at, domain = address.rpartition("@")
    if not at or len(local) > MAX_LOCAL or not _LOCAL.fullmatch(local):
        raise AddressError(f"not a valid e-mail address: {address[:300]!r}")
    result = f"{local}@{canonical_domain(domain)}"
    if len(result) > MAX_ADDRESS:
        raise AddressError(f"address longer than {MAX_ADDRESS} characters: {address[:300]!r}")
    return result


def domain_key(domain: str) -> str:
    """A domain as rate limits and searches key it: canonical, or lower-cased if it has no
    canonical form."""
    try:
        return canonical_domain(domain.strip())
    except AddressError:
        return domain.strip().lower()


def lookup_key(address: str) -> str:
    """How the suppression list and searches key an address: canonical, lower-cased.

    Addresses without a canonical form are lower-cased only (they never reach the wire).
    """
    try:
        return canonical_address(address.strip()).lower()
    except AddressError:
        return address.strip().lower()
