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


def _event(message: str, name: str = "maildaemon.intake", **fields: object) -> logging.LogRecord:
    record = _record(name, message)
    record.__dict__.update(fields)
    return record


FORGERY = "d-1\r\n12:00:00.000 INFO    delivery sent  delivery_id=forged"


def test_a_field_value_cannot_forge_a_text_line() -> None:
    line = TextFormatter().format(_event("command refused", delivery_id=FORGERY, source="a b"))
    assert "\n" not in line and "\r" not in line and len(line.splitlines()) == 1
    assert 'delivery_id="d-1\\r\\n12:00:00.000 INFO    delivery sent  delivery_id=forged"' in line
    assert line.endswith('source="a b"')


def test_text_values_are_quoted_and_escaped_consistently() -> None:
    values = {
        "plain": "abc",
        "empty": "",
        "quote": 'say "hi"',
        "equals": "a=b",
        "backslash": "a\\b",
        "quoted_backslash": 'a\\"',
        "controls": "\x00\x1b[31m\x7f\x85\u2028\u202e",
        "unicode": "Grüße",
        "items": ["example.com", "other.example"],
        "number": 3,
    }
    line = TextFormatter().format(_event("x", **values))
    tail = line.split("  ", 1)[1]
    assert tail == (
        'plain=abc empty="" quote="say \\"hi\\"" equals="a=b" backslash=a\\b'
        ' quoted_backslash="a\\\\\\"" controls="\\x00\\x1b[31m\\x7f\\x85\\u2028\\u202e"'
        ' unicode=Grüße items="[\\"example.com\\",\\"other.example\\"]" number=3'
    )
    assert tail.isprintable()


def test_text_keys_and_library_messages_are_escaped() -> None:
    record = _event("first\rforged", name="aiohttp.server", **{"a b=c\n": "v"})
    line = TextFormatter().format(record)
    assert "\r" not in line and "\n" not in line
    assert "first\\rforged" in line and line.endswith("a\\x20b\\x3dc\\n=v")


def test_a_json_line_stays_one_valid_line() -> None:
    value = FORGERY + "\x85\u2028\u2029\x1c"
    line = JsonFormatter().format(_event("command refused", delivery_id=value))
    assert len(line.splitlines()) == 1
    assert json.loads(line)["delivery_id"] == value


def test_a_block_event_is_one_indented_setting_a_line_in_text() -> None:
    settings = {"redis_url": "redis://r:6379/0", "allowed_sources": ["a", "b"], "bad": "x\ny"}
    text = TextFormatter().format(_event("configuration", _block=True, **settings))
    first, *rest = text.split("\n")
    assert first.endswith(" WARNING configuration")
    assert rest == [
        "    redis_url=redis://r:6379/0",
        '    allowed_sources="[\\"a\\",\\"b\\"]"',
        '    bad="x\\ny"',
    ]
    out = json.loads(JsonFormatter().format(_event("configuration", _block=True, **settings)))
    assert out["allowed_sources"] == ["a", "b"] and "_block" not in out


def test_a_traceback_in_text_is_indented_under_its_event() -> None:
    record = _record("maildaemon.app", "component crashed", RuntimeError("boom\n12:00 INFO forged"))
    first, *rest = TextFormatter().format(record).split("\n")
    assert first.endswith("component crashed")
    assert rest and all(line.startswith("    ") for line in rest)
    assert "    RuntimeError: boom" in rest and "    12:00 INFO forged" in rest
