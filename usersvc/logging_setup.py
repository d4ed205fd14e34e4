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
import math
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring
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

    @property
    def encoder(self) -> json.JSONEncoder:
        """The encoder of every value this formatter writes."""
        return self._encoder

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


# The keys JsonFormatter writes before a record's extras.
_PAYLOAD_KEYS = frozenset({"ts", "level", "logger", "msg", "request_id"})


@dataclass(frozen=True, slots=True)
class _Layout:
    """What JsonLinesHandler.emit_fields writes around the values of one set
    of keys: each key's ``,"key":`` and the static fields' tail."""

    heads: tuple[str, ...]
    tail: str


class JsonLinesHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """configure_logging's handler of the json format: a StreamHandler that
    can also write a line of known fields without a LogRecord.

    ``emit_fields`` is for the access log (usersvc/api/interceptors/
    access_log.py), one line per call: building a LogRecord, its filters'
    pass, JsonFormatter's walk of the record's attributes and its datetime,
    and the encoding of a dict cost about as much as a cheap call itself.
    The line it writes is the one the record would have become, byte for
    byte but for the clock (tests/unit/api/test_logging_setup.py compares
    them): same keys in the same order, same encoder, same escaping. It
    does so only while the handler is as configure_logging and
    add_static_fields leave it (a JsonFormatter, RequestIdFilter and
    static-field filters only); otherwise it declines, and the caller logs
    the ordinary way.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        # Per tuple of keys (None: declined); cleared on any change of
        # filters or formatter.
        self._layouts: dict[tuple[str, ...], _Layout | None] = {}
        self._second = -1
        self._second_text = ""

    def addFilter(self, filter: Any) -> None:
        super().addFilter(filter)
        self._layouts.clear()

    def removeFilter(self, filter: Any) -> None:
        super().removeFilter(filter)
        self._layouts.clear()

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        super().setFormatter(fmt)
        self._layouts.clear()

    def emit_fields(
        self,
        logger_name: str,
        levelno: int,
        message: str,
        request_id: str,
        keys: tuple[str, ...],
        values: Sequence[object],
    ) -> bool:
        """Write the line that a record of ``logger_name`` at ``levelno``
        (below WARNING: nothing to redact) with the already formatted
        ``message`` and the extras ``keys`` = ``values`` (str, int or finite
        float) would become, as this handler would write it. True when
        handled (written, or below the handler's level; a failed write goes
        to handleError as emit's does); False when it declines, having
        written nothing: the caller then logs the record the ordinary way.
        Raises nothing but RecursionError."""
        if levelno >= logging.WARNING:
            return False
        layout = self._layouts.get(keys, _UNKNOWN)
        if layout is _UNKNOWN:
            layout = self._layout(keys)
            self._layouts[keys] = layout
        if layout is None or len(values) != len(keys):
            return False
        if levelno < self.level:
            return True
        parts = []
        for head, value in zip(layout.heads, values, strict=True):
            # As the JSON encoder writes them (its bool is not int's repr).
            if isinstance(value, str):
                parts.append(head + encode_basestring(value))
            elif isinstance(value, float) and math.isfinite(value):
                parts.append(head + float.__repr__(value))
            elif isinstance(value, int) and not isinstance(value, bool):
                parts.append(head + int.__repr__(value))
            else:
                return False
        line = (
            f"{self._timestamp()}"
            f'","level":{encode_basestring(logging.getLevelName(levelno))}'
            f',"logger":{encode_basestring(logger_name)}'
            f',"msg":{encode_basestring(message)}'
            f',"request_id":{encode_basestring(request_id)}'
            f"{''.join(parts)}{layout.tail}"
        )
        try:
            self.acquire()
            try:
                self.stream.write(line)
                self.flush()
            finally:
                self.release()
        except RecursionError:
            raise
        except Exception:
            self.handleError(logging.LogRecord(logger_name, levelno, "", 0, message, None, None))
        return True

    def _timestamp(self) -> str:
        # '{"ts":"' and JsonFormatter's ts up to the millisecond; the text up
        # to the second is kept until the second changes.
        now = time.time_ns() // 1_000_000
        second, millisecond = divmod(now, 1000)
        if second != self._second:
            whole = datetime.fromtimestamp(second, tz=UTC).isoformat(timespec="seconds")
            self._second_text = '{"ts":"' + whole[:-6]
            self._second = second
        return f"{self._second_text}.{millisecond:03d}+00:00"

    def _layout(self, keys: tuple[str, ...]) -> _Layout | None:
        formatter = self.formatter
        if type(formatter) is not JsonFormatter:
            return None
        encode = formatter.encoder.encode
        # What the record would hold before the static fields' filters run.
        present = set(_RECORD_ATTRIBUTES) | {"request_id"}
        heads = []
        for key in keys:
            if key in present or key in _PAYLOAD_KEYS or key[:1] == "_":
                return None  # logging would refuse it, or the line would not show it
            present.add(key)
            heads.append(f",{encode(key)}:")
        tail = []
        for item in self.filters:
            if type(item) is RequestIdFilter:
                continue  # the record has its request id already
            if type(item) is not _StaticFields:
                return None
            for key, value in item.fields.items():
                if key in present or hasattr(logging.LogRecord, key):
                    continue  # the filter leaves what a record has
                present.add(key)
                if key[:1] != "_" and key not in _PAYLOAD_KEYS:
                    tail.append(f",{encode(key)}:{encode(value)}")
        tail.append("}\n" if self.terminator == "\n" else "}" + self.terminator)
        return _Layout(heads=tuple(heads), tail="".join(tail))


_UNKNOWN: Any = object()


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
    sink = sys.stderr if stream is None else stream
    handler: logging.StreamHandler[TextIO]
    if fmt == "json":
        handler = JsonLinesHandler(sink)
        handler.setFormatter(JsonFormatter())
    else:
        handler = logging.StreamHandler(sink)
        handler.setFormatter(TextFormatter())
    handler.set_name(_HANDLER_NAME)
    handler.addFilter(RequestIdFilter())
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

    @property
    def fields(self) -> dict[str, Any]:
        return self._fields

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
