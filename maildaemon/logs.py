"""Structured log events: a stable event name plus fields, one JSON object per line.

Secrets registered with ``add_secrets`` are replaced by ``***`` in every log line and, once
``scrub_standard_streams`` ran, in everything the process writes to stdout and stderr
(tracebacks and driver errors included): redaction that does not depend on each caller.

Lines from libraries (asyncpg's pool, aiohttp's server, asyncio, Python warnings) are
one line each too: their message's first line as ``event``, the exception as
``error_class`` and ``error``, never a traceback. Only maildaemon's own loggers attach
tracebacks (a crashed component).

The ``text`` format (for people) cannot be forged by what a field carries: a value with a
space, ``"``, ``=`` or any character that is not printable (CR, LF, other controls, line
separators, bidi overrides) is quoted, with ``\\``, ``"`` and those characters escaped;
keys and the event name are escaped the same way. Its only multi-line output is indented
under its first line (a traceback; an event logged with ``_block=True`` such as the
startup configuration, one ``key=value`` per line), so a line at column 0 always starts a
new event. The ``json`` format is one JSON object per line, the Unicode line separators
escaped too.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

_SECRETS: list[str] = []


def add_secrets(values: Iterable[str]) -> None:
    """Never print these strings (longest first, so a secret inside another goes too)."""
    merged = set(_SECRETS) | {v for v in values if v}
    _SECRETS[:] = sorted(merged, key=len, reverse=True)


def scrub(text: str) -> str:
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return text


class _ScrubbingStream:
    """A text stream that scrubs secrets from what is written through it."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(scrub(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def scrub_standard_streams() -> None:
    """Route stdout and stderr through the scrubber (idempotent)."""
    if not isinstance(sys.stdout, _ScrubbingStream):
        sys.stdout = _ScrubbingStream(sys.stdout)
    if not isinstance(sys.stderr, _ScrubbingStream):
        sys.stderr = _ScrubbingStream(sys.stderr)


_STANDARD = logging.LogRecord("", 0, "", 0, "", None, None).__dict__
_RESERVED = frozenset(_STANDARD) | {"message"}
# A LogRecord sets its standard attributes first, in this order; the fields of an event
# (``extra``) follow. Skipping the standard ones by position keeps a line cheap.
_FIRST_EXTRA = len(_STANDARD)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    items = itertools.islice(record.__dict__.items(), _FIRST_EXTRA, None)
    return {k: v for k, v in items if k not in _RESERVED and not k.startswith("_")}


class _Clock:
    """ISO 8601 timestamps with milliseconds; the seconds part is formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def iso(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._second, self._text = second, stamp
        return f"{self._text}.{int((created - second) * 1000):03d}+00:00"


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": self._clock.iso(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": _message(record),
        }
        out.update(_fields(record))
        _add_trace_ids(out)
        if record.exc_info:
            if _own(record):
                out["exception"] = self.formatException(record.exc_info)
            else:
                _add_error(out, record)
        return scrub(json.dumps(out, default=str, ensure_ascii=False)).translate(_JSON_BREAKS)


# JSON allows these unescaped inside strings, but str.splitlines and some log viewers
# break lines at them; escaped, the line is the same JSON value and stays one line.
_JSON_BREAKS = {0x85: "\\u0085", 0x2028: "\\u2028", 0x2029: "\\u2029"}
# Inside a quoted text value: the quote and the escape character itself.
_QUOTED_ESCAPES = {ord("\\"): "\\\\", ord('"'): '\\"'}
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_KEY_SPECIALS = frozenset(' "=\\')
_INDENT = "    "


def _escape_char(ch: str) -> str:
    if ch in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def _printable(text: str) -> str:
    """``text`` with every character that is not printable escaped (no line breaks left)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _text_key(key: str) -> str:
    """A key is never quoted: a space, ``"``, ``=``, ``\\`` or unprintable one is escaped."""
    key = scrub(key)
    if key and key.isprintable() and not any(ch in key for ch in _KEY_SPECIALS):
        return key
    escaped = (
        _escape_char(ch) if ch in _KEY_SPECIALS or not ch.isprintable() else ch for ch in key
    )
    return "".join(escaped) or '""'


def _text_value(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    text = scrub(text)
    if text and text.isprintable() and not any(ch in text for ch in ' "='):
        return text
    return '"' + _printable(text.translate(_QUOTED_ESCAPES)) + '"'


def _text_fields(fields: dict[str, Any], sep: str) -> str:
    return sep.join(f"{_text_key(k)}={_text_value(v)}" for k, v in fields.items())


def _indented(text: str) -> str:
    """A multi-line block under its event: every line indented, none of them forged."""
    return "".join(f"\n{_INDENT}{_printable(line)}" for line in text.splitlines())


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = _fields(record)
        _add_trace_ids(fields)
        if record.exc_info and not _own(record):
            _add_error(fields, record)
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S.%f")[:-3]
        text = f"{ts} {_printable(record.levelname):<7} {_printable(scrub(_message(record)))}"
        if fields and record.__dict__.get("_block"):
            text += f"\n{_INDENT}" + _text_fields(fields, f"\n{_INDENT}")
        elif fields:
            text += "  " + _text_fields(fields, " ")
        if record.exc_info and _own(record):
            text += _indented(scrub(self.formatException(record.exc_info)))
        return scrub(text)


def _own(record: logging.LogRecord) -> bool:
    return record.name == "maildaemon" or record.name.startswith("maildaemon.")


def _message(record: logging.LogRecord) -> str:
    """The event: maildaemon's stable name, or the first line of a library's message."""
    message = record.getMessage()
    if _own(record):
        return message
    return message.strip().split("\n", 1)[0][:500]


def _add_error(out: dict[str, Any], record: logging.LogRecord) -> None:
    """A library's exception as two fields instead of a traceback."""
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None:
        out.setdefault("error_class", type(exc).__name__)
        out.setdefault("error", str(exc).strip().split("\n", 1)[0][:500])


def _add_trace_ids(out: dict[str, Any]) -> None:
    if "otel_trace_id" in out:  # the event names its span (written outside it)
        return
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        out.setdefault("otel_trace_id", format(ctx.trace_id, "032x"))
        out.setdefault("otel_span_id", format(ctx.span_id, "016x"))


def recipients_field(addresses: Iterable[str], full: bool = False) -> list[str]:
    """Recipients as a log field: their domains (distinct, sorted) unless ``full``."""
    if full:
        return list(addresses)
    return sorted({a.rpartition("@")[2].lower() for a in addresses})


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    logging.captureWarnings(True)  # warnings.warn from libraries: one log line each
    # The lines never show the caller, thread or process: skip collecting them (the
    # logging HOWTO's "Optimization"); one outcome line per delivery stays cheap.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    root.setLevel(level)
    logging.getLogger("maildaemon").setLevel(level)
    for noisy in ("aiosmtplib", "asyncio", "yoyo", "aiohttp.access", "mail.log"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, /, **fields: Any) -> None:
    """Log the event ``name`` with stable fields."""
    if logger.isEnabledFor(level):
        exc_info = fields.pop("exc_info", None)
        logger.log(level, name, extra=fields, exc_info=exc_info, stacklevel=2)
