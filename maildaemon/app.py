"""Wiring and lifecycle: start in a fixed order, supervise every task, stop in reverse.

Startup: Redis ping → PostgreSQL pool → migrations → template catalog → HTTP listener →
background components. Shutdown (SIGTERM/SIGINT, bounded by MAIL_SHUTDOWN_TIMEOUT): HTTP
listener → intake and claiming → unstarted claims released → in-flight sends until the
deadline → results flushed → Redis and PostgreSQL closed → telemetry flushed. A component
that dies unexpectedly stops the whole process with a non-zero exit code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from aiohttp import web

from maildaemon.config import Settings
from maildaemon.errors import MailDaemonError
from maildaemon.exposure import check_read_exposure
from maildaemon.http.app import build_app
from maildaemon.http.keys import Readiness
from maildaemon.http.listener import ConnectionGuard, ListenerSignals, serve
from maildaemon.logs import add_secrets, event
from maildaemon.message.compose import Composer
from maildaemon.message.dkim import DkimSigner
from maildaemon.message.policy import command_policy
from maildaemon.message.render import TemplateCatalog
from maildaemon.pipeline.consumer import StreamConsumer
from maildaemon.pipeline.events import EventPublisher
from maildaemon.pipeline.heartbeat import ReplicaHeartbeat
from maildaemon.pipeline.jobs import JobQueue
from maildaemon.pipeline.lifecycle import RedisClient
from maildaemon.pipeline.probe import DestinationProbe
from maildaemon.pipeline.ready import announce_ready
from maildaemon.pipeline.report_listener import ReportListener
from maildaemon.pipeline.results import ResultWriter
from maildaemon.pipeline.retention import RetentionWorker
from maildaemon.pipeline.scheduler import Scheduler
from maildaemon.pipeline.stream_trim import StreamTrimmer
from maildaemon.pipeline.webhooks import WebhookDispatcher
from maildaemon.pipeline.worker import AttemptWorker
from maildaemon.redaction import redact_dsn
from maildaemon.retry import RetryPolicy
from maildaemon.returnpath import from_settings as return_path_of
from maildaemon.sending.destination import Destination
from maildaemon.sending.ratelimit import RateLimiter
from maildaemon.sending.smtp import tls_context
from maildaemon.startup import log_configuration, open_redis, step
from maildaemon.store import replicas
from maildaemon.store.migrate import migrate_or_check
from maildaemon.store.pipeline.db import Store
from maildaemon.store.webhooks.db import WebhookStore
from maildaemon.telemetry import Telemetry
from maildaemon.tracing import server_spans

log = logging.getLogger("maildaemon.app")
T = TypeVar("T")


class App:
    """The daemon: owns every resource and task from start to exit."""

    def __init__(
        self,
        settings: Settings,
        telemetry: Telemetry | None = None,
        *,
        dev_maildir: Path | None = None,
        dev_webhook: tuple[str, str] | None = None,
        before_hard_exit: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        # `maildaemon dev`: stops the servers it started when a second signal ends the
        # process at once (they would otherwise run on until the next `dev` stops them).
        self._before_hard_exit = before_hard_exit
        self.dev_maildir = dev_maildir  # `maildaemon dev`: the sink's maildir (dev inbox)
        self.dev_webhook = dev_webhook  # `maildaemon dev`: its receiver's URL and secret
        add_secrets(settings.secret_values())  # scrubbed from every log line from now on
        self.telemetry = telemetry or Telemetry(prometheus=settings.metrics_prometheus)
        self.readiness = Readiness()
        self._stop = asyncio.Event()
        self._crashed: list[str] = []
        self._signals = 0
        self.http_port: int | None = None

    def request_stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals > 1:
            event(log, "second signal: exiting at once", logging.ERROR, signal=signum)
            if self._before_hard_exit is not None:
                with contextlib.suppress(Exception):
                    self._before_hard_exit()
            os._exit(130)
        event(log, "shutdown requested", signal=signal.Signals(signum).name)
        self._stop.set()

    async def run(self) -> int:
        """Run until stopped; returns the process exit code."""
        s = self.settings
        check_read_exposure(s)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        log_configuration(s)
        async with contextlib.AsyncExitStack() as stack:
            stack.callback(self.telemetry.shutdown)
            redis = await open_redis(stack, s, self.telemetry.instruments)
            store = await step(
                "postgres pool",
                lambda: Store.open(
                    s.dsn,
                    min_size=s.postgres_pool_min,
                    max_size=s.postgres_pool_max,
                    pgbouncer=s.postgres_pgbouncer,
                ),
                15,
                dsn=redact_dsn(s.postgres_primary_dsn),
                pgbouncer=s.postgres_pgbouncer,
            )
            stack.push_async_callback(store.close)
            session = not (s.postgres_pgbouncer and s.postgres_listen_dsn is None)
            applied = await step(
                "migrations", lambda: migrate_or_check(store, s.session_dsn, session=session), 120
            )
            event(log, "migrations applied", applied=applied)
            if self.dev_webhook is not None:
                await WebhookStore(store.pool).ensure_dev_endpoint(*self.dev_webhook)
            self.readiness.migrations_applied = True
            catalog = await step(
                "template catalog",
                lambda: asyncio.to_thread(TemplateCatalog.load, s.template_dir, s.default_locale),
                60,
                template_dir=str(s.template_dir),
            )
            # Ready means writable: a demoted (read-only) primary answers pings too.
            self.readiness.checks = {"postgres": store.check_writable, "redis": redis.ping}
            signer = (
                DkimSigner(s.dkim_domain, s.dkim_selector, s.dkim_private_key_file)
                if s.dkim_domain and s.dkim_selector and s.dkim_private_key_file
                else None
            )
            runner = await step(
                "internal http listener",
                lambda: self._start_http(stack, catalog),
                15,
                addr=s.internal_http_addr,
            )
            code = await self._run_components(store, redis, catalog, signer, runner)
        event(log, "stopped", exit_code=code)
        return code

    async def _start_http(
        self, stack: contextlib.AsyncExitStack, catalog: TemplateCatalog
    ) -> web.AppRunner:
        s = self.settings
        host = s.http_host_port[0]
        # The operator API's own small pool with a statement timeout: a slow search waits
        # for (and times out on) these connections, never the pipeline's.
        api_store = await Store.open(
            s.dsn,
            min_size=1,
            max_size=s.api_pool_max,
            statement_timeout=s.api_statement_timeout,
            application_name="maildaemon-api",
            pgbouncer=s.postgres_pgbouncer,
        )
        stack.push_async_callback(api_store.close)
        guard = self._connection_guard()
        app = build_app(
            s,
            api_store,
            self.readiness,
            command_policy(s, catalog),
            catalog_hash=catalog.content_hash,
            catalog=catalog,
            dev_maildir=self.dev_maildir,
            on_refusal=lambda reason: self.telemetry.instruments.api_refusals.add(
                1, {"reason": reason}
            ),
            metrics=self.telemetry.prometheus if s.metrics_prometheus else None,
            middlewares=server_spans(self.telemetry.traced),
            on_timeout=guard.timed_out,
            on_pacing=self.telemetry.instruments.count_paced,
        )
        runner = await serve(app, s, guard)
        addresses = runner.addresses
        if addresses:
            self.http_port = int(addresses[0][1])
        event(log, "internal http listening", host=host, port=self.http_port)
        return runner

    def _connection_guard(self) -> ConnectionGuard:
        inst = self.telemetry.instruments
        signals = ListenerSignals(
            refused=lambda: inst.http_refused.add(1),
            accept_error=lambda name: inst.http_accept_errors.add(1, {"error": name}),
            timed_out=lambda phase: inst.http_timeouts.add(1, {"phase": phase}),
            open_connections=lambda n: setattr(inst, "http_connections_open", n),
        )
        return ConnectionGuard.for_settings(self.settings, signals)

    async def _run_components(
        self,
        store: Store,
        redis: RedisClient,
        catalog: TemplateCatalog,
        signer: DkimSigner | None,
        runner: web.AppRunner,
    ) -> int:
        c = _Components.build(self.settings, store, redis, catalog, signer, self.telemetry)
        self.readiness.conditions["smtp_destination"] = c.destination.describe
        tasks: dict[str, asyncio.Task[None]] = {}

        def spawn(task_name: str, coro: Awaitable[None]) -> None:
            task: asyncio.Task[None] = asyncio.ensure_future(coro)
            task.set_name(task_name)
            task.add_done_callback(self._watch)
            tasks[task_name] = task

        s = self.settings
        spawn("event-publisher", c.publisher.run())
        spawn("result-writer", c.results.run())
        for w in c.workers:
            spawn(f"attempt-worker-{w.index}", w.run())
        event(
            log,
            "attempt worker pool started",
            concurrency=len(c.workers),
            smtp_mode=s.smtp_mode,
            smtp_addr=s.smtp_addr,
            smtp_security=s.smtp_security,
        )
        spawn("destination-probe", c.probe.run())
        spawn("scheduler", c.scheduler.run())
        spawn("command-consumer", c.consumer.run())
        spawn("retention-worker", c.retention.run())
        spawn("replica-heartbeat", c.heartbeat.run())
        spawn("stream-trimmer", c.trimmer.run())
        spawn("report-listener", c.reports.run())
        spawn("webhook-dispatcher", c.webhooks.run())
        event(log, "started", http_port=self.http_port, consumer=s.consumer_name)
        started = (c.consumer.started, c.scheduler.started)
        if await announce_ready(s, self.telemetry, started, self._stop, self.http_port):
            self.readiness.workers_running = True  # /readyz: every component runs
        await self._stop.wait()
        await self._shut_down(c, tasks, store, runner)
        return 1 if self._crashed else 0

    async def _shut_down(
        self,
        c: _Components,
        tasks: dict[str, asyncio.Task[None]],
        store: Store,
        runner: web.AppRunner,
    ) -> None:
        """HTTP first, then intake and claims, unstarted claims back, in-flight sends get
        the rest of the timeout, then results and their events."""
        s = self.settings
        deadline = time.monotonic() + s.shutdown_timeout
        c.queue.stop()  # at once: no new SMTP transaction begins after the signal
        self.readiness.shutting_down = True
        self.readiness.workers_running = False
        event(log, "shutting down", timeout_s=s.shutdown_timeout, crashed=self._crashed or None)

        def left() -> float:
            return max(0.05, deadline - time.monotonic())

        await runner.cleanup()
        event(log, "internal http listener stopped")
        c.consumer.stop()
        c.scheduler.stop()
        c.retention.stop()
        c.heartbeat.stop()
        c.probe.stop()
        c.trimmer.stop()
        c.reports.stop()
        c.webhooks.stop()  # in-flight webhook attempts get one MAIL_WEBHOOK_TIMEOUT
        stopping = (
            "stream-trimmer",
            "report-listener",
            "webhook-dispatcher",
            "command-consumer",
            "scheduler",
            "retention-worker",
            "replica-heartbeat",
            "destination-probe",
        )
        await self._finish(tasks, stopping, left())
        await self._release_unstarted(c.queue, store)
        workers = tuple(f"attempt-worker-{w.index}" for w in c.workers)
        await self._finish(tasks, workers, left())
        await self._release_unstarted(c.queue, store)  # taken by a worker, never begun
        c.results.close()
        # The writer gets a few seconds beyond the deadline: it holds results of sends
        # that already happened, and losing them would mean sending again.
        await self._finish(tasks, ("result-writer",), left() + 5.0)
        c.publisher.stop()  # one more pass for the last results; the rest waits in the outbox
        await self._finish(tasks, ("event-publisher",), left() + 2.0)
        event(log, "components stopped")

    @staticmethod
    async def _release_unstarted(queue: JobQueue, store: Store) -> None:
        unstarted = queue.take_unstarted()
        if unstarted:
            with contextlib.suppress(MailDaemonError):
                released = await store.release(j.claim for j in unstarted)
                event(log, "unstarted claims released", count=released)

    async def _finish(
        self, tasks: dict[str, asyncio.Task[None]], names: tuple[str, ...], timeout: float
    ) -> None:
        waiting = [tasks[n] for n in names if n in tasks]
        if not waiting:
            return
        _, pending = await asyncio.wait(waiting, timeout=timeout)
        for task in pending:
            event(
                log,
                "component did not stop in time; cancelled",
                logging.WARNING,
                component=task.get_name(),
            )
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2.0)

    def _watch(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and self._stop.is_set():
            return
        self._crashed.append(task.get_name())
        if exc is not None:
            event(
                log,
                "component crashed",
                logging.ERROR,
                component=task.get_name(),
                error=repr(exc),
                exc_info=exc,
            )
        else:
            event(log, "component exited unexpectedly", logging.ERROR, component=task.get_name())
        self._stop.set()


@dataclass
class _Components:
    """The background components of one daemon, wired to each other."""

    queue: JobQueue
    publisher: EventPublisher
    results: ResultWriter
    scheduler: Scheduler
    consumer: StreamConsumer
    retention: RetentionWorker
    heartbeat: ReplicaHeartbeat
    workers: list[AttemptWorker]
    destination: Destination
    probe: DestinationProbe
    trimmer: StreamTrimmer
    reports: ReportListener
    webhooks: WebhookDispatcher

    @classmethod
    def build(
        cls,
        s: Settings,
        store: Store,
        redis: RedisClient,
        catalog: TemplateCatalog,
        signer: DkimSigner | None,
        telemetry: Telemetry,
    ) -> _Components:
        inst = telemetry.instruments
        name = s.consumer_name
        composer = Composer(
            catalog,
            s.smtp_from or "maildaemon <noreply@maildaemon.localhost>",
            signer,
            return_path_of(s),
        )
        queue = JobQueue.for_connections(s.attempt_worker_concurrency, s.result_window)
        webhooks = WebhookDispatcher(s, WebhookStore(store.pool), inst)
        publisher = EventPublisher(s, store, redis, inst, webhooks.wake)
        results = ResultWriter(s, store, inst, name, publisher.wake)
        destination = Destination(s.smtp_addr or "stub")
        tracer = telemetry.tracer
        scheduler = Scheduler(s, store, composer, queue, results, inst, name, destination, tracer)
        policy = command_policy(s, catalog)
        consumer = StreamConsumer(s, redis, store, policy, inst, scheduler.wake, tracer)
        me = replicas.Identity(
            name, catalog.content_hash, policy.fingerprint(), sorted(catalog.template_ids)
        )
        retry = RetryPolicy(s.retry_ladder, s.retry_jitter, s.unknown_outcome_policy)
        limiter = RateLimiter(s.global_rate_limit, s.domain_rate_limit, s.domain_backoff)
        context = tls_context(s)
        shared = (composer.sender_address, queue, results, retry, limiter, inst, destination)
        workers = [
            AttemptWorker(i, s, context, *shared, tracer)
            for i in range(s.attempt_worker_concurrency)
        ]
        probe = DestinationProbe(s, context, destination, queue, store, inst)
        return cls(
            queue,
            publisher,
            results,
            scheduler,
            consumer,
            RetentionWorker(s, store, inst),
            ReplicaHeartbeat(store, me, inst),
            workers,
            destination,
            probe,
            StreamTrimmer(s, redis, inst),
            ReportListener(s, store, inst),
            webhooks,
        )
