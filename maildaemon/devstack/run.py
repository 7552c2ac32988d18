"""``maildaemon dev``: the embedded stack plus the daemon, in one command."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys
from pathlib import Path

from maildaemon.config import Settings, load_settings
from maildaemon.devstack.postgres import pick_free_port
from maildaemon.devstack.stack import DevStack
from maildaemon.devstack.webhook_sink import DevWebhookSink

_BANNER = """\
maildaemon dev: local stack in {state_dir}
  Redis       {redis}   (stream {stream})
  PostgreSQL  {postgres}
  SMTP sink   {smtp}   STARTTLS, CA {ca_file}
              received mail is kept as .eml files in {maildir}
              mail to bounce@, delay@ or complaint@ any domain is reported back later
  Reports     {reports}   (report listener: bounces, delays, complaints
              for {bounce_domain}; maildaemon bounces list)
  HTTP API    http://{http}
  Console     http://{http}/console/   (dev inbox: http://{http}/console/#/inbox)
  Operator token  {token}   (MAIL_OPERATOR_TOKEN, also in {env_file})
  Metrics     {metrics}
  Webhooks    {webhook}   signed; verified ones in {webhook_log}
              (console: http://{http}/console/#/webhooks)

Send a test mail from another shell:
  set -a; . {env_file}; set +a
  {cli} enqueue --source authsession --template signin_code \\
      --to you@example.com --var code=123456 --var expires_minutes=10
  curl -s http://{http}/api/v1/internal/deliveries/<delivery_id>
  open http://{http}/console/#/inbox to read the caught mail

Ctrl-C stops the daemon and every server started here.
"""


def run_dev(state_dir: Path, http_addr: str | None = None) -> int:
    from maildaemon.app import App
    from maildaemon.logs import setup_logging

    stack = DevStack(state_dir)
    try:
        env = stack.start()
        if http_addr:
            env["MAIL_INTERNAL_HTTP_ADDR"] = http_addr
        env_file = stack.state_dir / "dev.env"
        # It holds the operator token: readable by its owner only.
        fd = os.open(env_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
        env_file.chmod(0o600)
        sink = DevWebhookSink(stack.state_dir / "webhooks.jsonl", pick_free_port())
        env.setdefault("MAIL_WEBHOOK_ALLOW_HTTP", "true")  # the local receiver is http
        env.setdefault("MAIL_WEBHOOK_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128")
        os.environ.update(env)
        os.environ.setdefault("MAIL_LOG_FORMAT", "text")
        os.environ.setdefault("MAIL_METRICS_PROMETHEUS", "true")  # /metrics on by default
        settings = load_settings()
        _print_banner(stack, env, settings, env_file, sink)
        setup_logging(settings.log_level, settings.log_format)

        async def main() -> int:
            await sink.start()
            try:
                app = App(
                    settings,
                    dev_maildir=stack.maildir,
                    dev_webhook=(sink.url, sink.secret),
                    before_hard_exit=stack.stop,
                )
                return await app.run()
            finally:
                await sink.stop()

        return asyncio.run(main())
    finally:
        # A Ctrl-C while the servers stop would leave the rest running: the stop is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop()


def _print_banner(
    stack: DevStack, env: dict[str, str], settings: Settings, env_file: Path, sink: DevWebhookSink
) -> None:
    print(
        _BANNER.format(
            state_dir=stack.state_dir,
            redis=env["MAIL_REDIS_MASTER_ADDR"],
            stream=settings.command_stream,
            postgres=_display_dsn(env),
            smtp=env["MAIL_SMTP_ADDR"],
            ca_file=env["MAIL_SMTP_CA_FILE"],
            maildir=stack.maildir,
            http=env["MAIL_INTERNAL_HTTP_ADDR"],
            metrics=(
                f"http://{env['MAIL_INTERNAL_HTTP_ADDR']}/metrics   (Prometheus text)"
                if settings.metrics_prometheus
                else "off (MAIL_METRICS_PROMETHEUS=false)"
            ),
            env_file=env_file,
            cli=_cli_path(),
            token=env["MAIL_OPERATOR_TOKEN"],
            reports=env.get("MAIL_BOUNCE_LISTEN_ADDR", "off"),
            bounce_domain=env.get("MAIL_BOUNCE_DOMAIN", "-"),
            webhook=sink.url,
            webhook_log=sink.out,
        ),
        file=sys.stderr,
        flush=True,
    )


def _cli_path() -> str:
    """How to call this maildaemon from another shell (the venv may not be activated)."""
    beside = Path(sys.executable).parent / "maildaemon"
    return str(beside) if beside.exists() else "maildaemon"


def _display_dsn(env: dict[str, str]) -> str:
    return env["MAIL_POSTGRES_PRIMARY_DSN"]
