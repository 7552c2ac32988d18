"""Log lines: library warnings are one structured line without a traceback; maildaemon's
own errors keep theirs; recipients are logged as domains unless asked otherwise."""

from __future__ import annotations

import json
import logging
import sys

from opentelemetry.sdk.trace import TracerProvider

from maildaemon.logs import JsonFormatter, TextFormatter, recipients_field


def _record(name: str, message: str, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = None
    if exc is not None:
        try:
            raise exc
        except BaseException:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, exc_info)


def test_a_library_warning_with_an_exception_is_one_json_line_without_traceback() -> None:
    record = _record(
        "asyncpg.pool",
        "Failed to restore the pool connection\nsecond line",
        ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 5432)"),
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    out = json.loads(line)
    assert out["event"] == "Failed to restore the pool connection"
    assert out["logger"] == "asyncpg.pool"
    assert out["error_class"] == "ConnectionRefusedError"
    assert "5432" in out["error"]
    assert "exception" not in out and "Traceback" not in line


def test_a_python_warning_is_one_text_line() -> None:
    record = _record(
        "py.warnings",
        "/x/asyncpg/connection.py:137: ResourceWarning: unclosed connection\n"
        "  warnings.warn(msg)\n",
    )
    line = TextFormatter().format(record)
    assert "\n" not in line and "ResourceWarning: unclosed connection" in line


def test_a_library_error_in_text_format_has_no_traceback() -> None:
    record = _record("aiohttp.server", "Error handling request", RuntimeError("boom"))
    line = TextFormatter().format(record)
    assert "\n" not in line
    assert "error_class=RuntimeError" in line and "error=boom" in line


def test_maildaemon_errors_keep_their_traceback() -> None:
    record = _record("maildaemon.app", "component crashed", RuntimeError("boom"))
    out = json.loads(JsonFormatter().format(record))
    assert out["event"] == "component crashed"
    assert "Traceback" in out["exception"] and "RuntimeError: boom" in out["exception"]


def test_a_line_inside_a_span_carries_its_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("attempt") as span:
        out = json.loads(JsonFormatter().format(_record("maildaemon.worker", "smtp attempt")))
    ctx = span.get_span_context()
    assert out["otel_trace_id"] == format(ctx.trace_id, "032x")
    assert out["otel_span_id"] == format(ctx.span_id, "016x")
    assert "otel_trace_id" not in json.loads(JsonFormatter().format(_record("maildaemon.x", "y")))


def test_recipients_are_domains_unless_full() -> None:
    addresses = ["Ada@Example.COM", "bob@example.com", "eve@other.example"]
    assert recipients_field(addresses) == ["example.com", "other.example"]
    assert recipients_field(addresses, full=True) == addresses
