"""Redaction cannot fail: a DSN password with "/", "?", "#", "%" or "@" (encoded or not) is
never printed -- not at startup, not by `check` or `migrate`, not in driver errors or
tracebacks. Each path runs the real CLI; all of its output is searched for the password."""

from __future__ import annotations

from urllib.parse import quote, unquote

import pytest

from maildaemon.devstack.postgres import pick_free_port
from maildaemon.redaction import split_dsn
from tests.acceptance.test_process import daemon_env, finish, spawn

PASSWORDS = ["p/ss?w#rd", "50%off&x=y", "sl%2Fash%3Fq%zz", "a@b#c/d?e%"]


def spellings(password: str) -> set[str]:
    decoded = unquote(password)
    forms = {password, decoded, quote(decoded, safe=""), quote(password, safe="")}
    # Pieces a driver might echo after cutting the URL at "/", "?", "#" or "@".
    for sep in "/?#@":
        forms |= {piece for piece in password.split(sep) if len(piece) >= 4}
    return forms


async def _run(*args: str, env: dict[str, str], timeout: float = 90) -> tuple[int, str]:
    proc = await spawn(*args, env=env)
    out, err = await finish(proc, timeout)
    assert proc.returncode is not None
    return proc.returncode, out + err


def _assert_clean(output: str, password: str) -> None:
    for form in spellings(password):
        assert form not in output, f"{form!r} printed:\n{output}"


@pytest.mark.parametrize("password", PASSWORDS)
async def test_password_is_never_printed_when_postgres_fails(
    password: str, redis_addr: str
) -> None:
    dead = pick_free_port()
    env = daemon_env(f"postgresql://mail:{password}@127.0.0.1:{dead}/mail", redis_addr, None)
    code, output = await _run("run", env=env)
    assert code != 0 and '"event": "configuration"' in output, output
    assert "startup failed" in output and "postgres pool" in output
    assert f"postgresql://mail@127.0.0.1:{dead}/mail" in output  # the redacted form
    _assert_clean(output, password)

    code, output = await _run("migrate", env=env)
    assert code != 0 and "migrations failed" in output, output
    _assert_clean(output, password)

    code, output = await _run("check", env=env)
    assert code == 0 and "configuration ok" in output, output
    _assert_clean(output, password)

    # A driver that echoes what it was given (a bad option), and a traceback path.
    bogus = daemon_env(
        f"postgresql://mail:{password}@127.0.0.1:{dead}/mail?sslmode=bogus&password={password}",
        redis_addr,
        None,
    )
    for args in (("run",), ("migrate",), ("deliveries",)):
        code, output = await _run(*args, env=bogus)
        assert code != 0, output
        _assert_clean(output, password)


async def test_daemon_connects_with_such_a_password(pg_dsn: str, redis_addr: str) -> None:
    """The password is percent-encoded once for the drivers: connecting still works (the
    test server trusts local connections, so this proves the DSN is cut in the right place)."""
    scheme, user, _password, hosts, rest = split_dsn(pg_dsn)
    password = PASSWORDS[0] + "%zz@1"
    env = daemon_env(f"{scheme}://{user}:{password}@{hosts}{rest}", redis_addr, None)
    code, output = await _run("migrate", env=env)
    assert code == 0 and "is up to date" in output, output
    _assert_clean(output, password)
