"""Tracing helpers shared by the components: the producer's ``traceparent`` as a parent
context, trace ids for log lines, and server spans for the internal API.

The official contrib instrumentations are not used (see ``server_spans`` and
bench/RESULTS.md): the aiohttp-server middleware works only after its instrumentor has
replaced ``aiohttp.web.Application`` process-wide, and the asyncpg and redis packages pin
one exact semantic-conventions release each, trailing the SDK — as dependencies they made
a clean ``pip install`` unresolvable.
"""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

_PROPAGATOR = TraceContextTextMapPropagator()


def parent_context(traceparent: str | None) -> otel_context.Context | None:
    """The producer's span as a parent (W3C ``traceparent``), or None to start a trace."""
    if not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(ctx).get_span_context().is_valid:
        return None
    return ctx


def log_ids(span: trace.Span) -> dict[str, str]:
    """``otel_trace_id`` / ``otel_span_id`` of a span, for a log line written outside it."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return {}
    return {
        "otel_trace_id": format(ctx.trace_id, "032x"),
        "otel_span_id": format(ctx.span_id, "016x"),
    }


# Probes and scrapes come every few seconds from machines: no span for them.
_UNTRACED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def server_spans(provider: trace.TracerProvider | None) -> tuple[Middleware, ...]:
    """A SERVER span per internal API request, joining the caller's trace when it sends a
    ``traceparent``; probes and scrapes left out.

    Our own middleware, not opentelemetry-instrumentation-aiohttp-server: that package's
    middleware only works once its instrumentor has run, and the instrumentor replaces
    ``aiohttp.web.Application`` for the whole process (every app, not just ours). None
    (spans are not recorded): no middleware.
    """
    if provider is None:
        return ()
    tracer = provider.get_tracer("maildaemon.http")

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _UNTRACED_PATHS:
            return await handler(request)
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else request.path
        with tracer.start_as_current_span(
            f"{request.method} {route}",
            context=_PROPAGATOR.extract(request.headers),
            kind=trace.SpanKind.SERVER,
            attributes={
                "http.request.method": request.method,
                "http.route": route,
                "url.path": request.path,
            },
        ) as span:
            try:
                response = await handler(request)
            except web.HTTPException as exc:
                _status(span, exc.status)
                raise
            _status(span, response.status)
            return response

    return (middleware,)


def _status(span: trace.Span, status: int) -> None:
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(trace.Status(trace.StatusCode.ERROR))
