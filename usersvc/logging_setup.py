"""Process-wide logging: JSON lines for machines (the default), text for people.

Every record carries the request id of the call it was logged in (from
``usersvc.observability.context``), so one call's lines can be found together. Fields
passed with ``extra=`` (method, code, duration_ms, peer, principal, ...) become
top-level JSON keys. Nothing in the service logs request or response bodies:
they hold passwords and tokens.

Exception texts are the one place where data we did not choose reaches a
line: a driver error quotes the failing row ("Failing row contains (...)",
password hash included), a library may quote a token it refused. So
tracebacks, and the messages of WARNING and above (where exceptions get
formatted into the message), are redacted: anything shaped like a bcrypt
hash, a JWT, a refresh token or a bearer credential, and failing-row
details. INFO lines (the access log) are built from fields we chose and are
not searched: they are the hot path.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from usersvc.observability.context import current_request_id

FORMATS = ("json", "text")
# Marks the handler configure_logging installs, so a second call replaces it.
_HANDLER_NAME = "usersvc"

# (pattern, replacement) pairs; see the module docstring.
_REDACTIONS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\$2[abxy]\$\d\d\$[./A-Za-z0-9]{53}"), "[redacted bcrypt hash]"),
    (
        re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"),
        "[redacted JWT]",
    ),
    (re.compile(r"(?<![A-Za-z0-9_-])rt_[A-Za-z0-9_-]{20,}"), "[redacted refresh token]"),
    (re.compile(r"(?i)\b(bearer|basic)\s+[^\s'\",]+"), r"\1 [redacted]"),
    # PostgreSQL's DETAIL of not-null and check violations: the whole row.
    (re.compile(r"Failing row contains \(.*"), "Failing row contains ([redacted])"),
)


def redact(text: str) -> str:
    """``text`` without secret-shaped substrings (bcrypt hashes, JWTs,
    refresh tokens, bearer credentials, failing-row details). Never raises."""
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__
) | {"message", "asctime", "request_id", "taskName"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the call that logged it.

    Runs when the record is emitted, in the logging call's own context, so the
    id is right even if a handler formats the record later on another thread.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _RECORD_ATTRIBUTES and key[:1] != "_"
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, extras,
    and exc (the traceback) when there is one."""

    def __init__(self) -> None:
        super().__init__()
        # One encoder for all records: json.dumps with options builds a new
        # one per call. default=str: an odd extra value must never make a log
        # call fail.
        self._encoder = json.JSONEncoder(ensure_ascii=False, default=str, separators=(",", ":"))

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        sensitive = record.levelno >= logging.WARNING
        if sensitive:
            message = redact(message)
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": message,
            "request_id": getattr(record, "request_id", ""),
        }
        for key, value in record.__dict__.items():
            if key in _RECORD_ATTRIBUTES or key[:1] == "_" or key in payload:
                continue
            if sensitive and isinstance(value, str):
                value = redact(value)
            payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return self._encoder.encode(payload)

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(super().formatStack(stack_info))


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger [request id] message key=value ...`` for terminals."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:
        return redact(super().formatStack(stack_info))

    def format(self, record: logging.LogRecord) -> str:
        if not hasattr(record, "request_id"):
            record.request_id = ""
        line = super().format(record)
        # Also when a traceback is attached at a lower level: another handler
        # may have cached the record's exception text unredacted.
        sensitive = record.levelno >= logging.WARNING or bool(record.exc_info or record.stack_info)
        if sensitive:
            line = redact(line)
        extras = _extra_fields(record)
        if not extras:
            return line
        fields = " ".join(f"{key}={value}" for key, value in extras.items())
        if sensitive:
            fields = redact(fields)
        head, sep, tail = line.partition("\n")  # keep a traceback below the fields
        return f"{head} {fields}{sep}{tail}"


def configure_logging(fmt: str, level: str, *, stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr by default) in ``fmt``
    ("json" or "text") from ``level`` up. Calling it again replaces the
    handler it installed before and leaves other handlers alone.

    Raises ValueError for an unknown format or level.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    numeric_level = logging.getLevelName(level.upper())
    if not isinstance(numeric_level, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric_level)
    # No formatter here prints a record's thread or process (a worker's pid
    # is a field of its own, add_static_fields): not looking them up saves
    # every record a getpid system call and two module lookups, and the
    # access log writes one record per call.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Alembic announces each of its internal plugins at INFO on every import:
    # noise for operators, so only its warnings come through.
    logging.getLogger("alembic.runtime.plugins").setLevel(max(numeric_level, logging.WARNING))


class _StaticFields(logging.Filter):
    def __init__(self, fields: dict[str, Any]) -> None:
        super().__init__()
        self._fields = fields

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in self._fields.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


def add_static_fields(**fields: Any) -> None:
    """Stamp every record that the handler of ``configure_logging`` emits
    with ``fields`` (a worker's number and pid, so the lines of N workers
    in one stream can be told apart). Raises nothing."""
    for handler in logging.getLogger().handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.addFilter(_StaticFields(dict(fields)))
