"""Secrets kept out of output: DSNs cut where the password really ends (unencoded "/",
"?", "#", "%" and "@" included), normalised for the drivers, redacted for logs, and every
spelling of a secret for the output scrubber."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qsl, quote, unquote

from pydantic import SecretStr

_HOSTS = re.compile(r"[A-Za-z0-9.\-\[\]:,%_]*")


def _cut(text: str) -> int:
    """Where the authority part of ``text`` ends: its first "/", "?" or "#"."""
    return min((i for i in (text.find(c) for c in "/?#") if i >= 0), default=len(text))


def split_dsn(text: str) -> tuple[str, str | None, str | None, str, str]:
    """(scheme, user, raw password, hosts, rest) of a URL DSN; user None without "@".

    The userinfo ends at the last "@" that is followed by a plausible host list and is not
    inside the query (which starts at the first "?" after the last "/"); so unencoded "/",
    "?", "#", "%" and even "@" in a password are found where they are.
    """
    scheme, _, rest = text.partition("://")
    slash = rest.rfind("/")
    query = rest.find("?", slash + 1) if slash >= 0 else -1
    ats = [i for i, char in enumerate(rest) if char == "@"]
    plausible = [i for i in ats if _HOSTS.fullmatch(rest[i + 1 :][: _cut(rest[i + 1 :])])]
    before_query = [i for i in plausible if query < 0 or i < query]
    at = (before_query or plausible or ats or [-1])[-1]
    if at < 0:
        return scheme, None, None, rest[: _cut(rest)], rest[_cut(rest) :]
    userinfo, after = rest[:at], rest[at + 1 :]
    user, colon, password = userinfo.partition(":")
    return scheme, user, password if colon else None, after[: _cut(after)], after[_cut(after) :]


def normalize_dsn(text: str) -> str:
    """The DSN with user and password percent-encoded exactly once.

    Passwords are often pasted unencoded ("p/ss?w#rd"); libpq and asyncpg would then cut
    the URL in the middle of the password and echo pieces of it in their errors. Valid
    %XX sequences are taken as already encoded, any other "%" as a literal.
    """
    scheme, user, password, hosts, rest = split_dsn(text)
    if user is None:
        return text
    userinfo = quote(unquote(user), safe="")
    if password is not None:
        userinfo += ":" + quote(unquote(password), safe="")
    return f"{scheme}://{userinfo}@{hosts}{rest}"


def spellings(secret: str) -> list[str]:
    """A secret as it may appear in output: raw, URL-encoded, JSON- and repr-escaped."""
    forms = {secret, quote(secret, safe=""), quote(secret), quote(secret, safe="").lower()}
    forms |= {
        json.dumps(secret)[1:-1],
        repr(secret)[1:-1],
        secret.encode("unicode_escape").decode(),
    }
    return [form for form in forms if form]


def dsn_secrets(text: str) -> list[str]:
    """The DSN's password in every spelling (as written, decoded, encoded), also a
    ``password=`` query parameter."""
    _scheme, _user, password, _hosts, rest = split_dsn(text)
    found: list[str] = []
    if password:
        found += spellings(password) + spellings(unquote(password))
    query = rest.partition("?")[2].partition("#")[0]
    for key, value in parse_qsl(query, keep_blank_values=False):
        if key.lower() == "password" and value:
            found += spellings(value)
    return found


def redact_dsn(dsn: SecretStr | str) -> str:
    """``scheme://user@hosts/dbname``: no password, no query (which may carry one)."""
    text = dsn.get_secret_value() if isinstance(dsn, SecretStr) else dsn
    scheme, user, _password, hosts, rest = split_dsn(text)
    path = rest.partition("?")[0].partition("#")[0]
    who = f"{unquote(user)}@" if user else ""
    return f"{scheme}://{who}{hosts}{path}"
