"""`maildaemon enqueue` checks a command against the template catalog before it is sent."""

from __future__ import annotations

import json

from maildaemon.devstack.postgres import pick_free_port
from tests.acceptance.test_process import daemon_env, finish, spawn
from tests.support import redis_client


async def _enqueue(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await spawn("enqueue", *args, env=env)
    out, err = await finish(proc, 60)
    assert proc.returncode is not None
    return proc.returncode, out, err


async def test_enqueue_refuses_what_the_template_cannot_render(redis_addr: str) -> None:
    dsn = f"postgresql://mail@127.0.0.1:{pick_free_port()}/mail"  # never contacted
    env = daemon_env(dsn, redis_addr, None)
    base = ["--source", "notification", "--to", "ada@Straße.DE"]
    code, _out, err = await _enqueue(
        env, *base, "--template", "password_reset", "--var", "expires_minutes=5"
    )
    assert code == 2 and "(missing_variable)" in err and "reset_url" in err, err
    code, _out, err = await _enqueue(
        env,
        *base,
        "--template",
        "password_reset",
        "--var",
        "expires_minutes=5",
        "--var",
        "reset_url=javascript:alert(1)",
    )
    assert code == 2 and "(invalid_link)" in err, err
    client = redis_client(redis_addr)
    try:
        assert await client.xlen(env.get("MAIL_COMMAND_STREAM", "mail:delivery_commands")) == 0
        code, out, err = await _enqueue(
            env,
            *base,
            "--template",
            "password_reset",
            "--var",
            "expires_minutes=5",
            "--var",
            "reset_url=https://app.example/r?t=1",
        )
        assert code == 0, err
        entry_id = json.loads(out)["stream_entry_id"]
        [(_, fields)] = await client.xrange("mail:delivery_commands", entry_id, entry_id)
        document = json.loads(fields[b"command"])
        assert document["to"] == ["ada@Straße.DE"]  # sent as given; canonical at intake
    finally:
        await client.aclose()
