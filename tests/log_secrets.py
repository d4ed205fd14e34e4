"""Proof that no secret reaches a log line.

Two halves, both fed while a test tier runs (tests/e2e/conftest.py wires them):

- ``SecretLedger``: every secret the tests handled. Passwords sent, access
  and refresh tokens received or presented, refresh token hashes, signing
  keys and HS256 secrets are added where the tests create, see or configure
  them. Secrets shorter than ``MIN_SECRET_CHARS`` are not kept: strings like
  "password" occur in log lines for honest reasons.
- ``LogSweep``: every log line the service emits, as the production
  formatters write it (JSON and text, so escaping can hide nothing), from
  in-process servers through a handler on the root logger, and from
  subprocess servers through their captured stderr and log files.

``LogSweep.findings`` reports each line that carries a known secret, or
anything shaped like a bcrypt hash, a JWT or a refresh token even when no
test recorded it (imported hashes, the dummy hash, a token nobody saw).

The search must stay cheap with thousands of secrets and tens of thousands
of lines, so it is not "every secret against every line". Each secret is
indexed by ``_STRIDE`` substrings of ``_KEY_CHARS`` characters at
consecutive offsets near its end (tails are random; heads are shared, every
JWT starts with the same header and every bcrypt hash with ``$2b$``). A chunk
of text yields its substrings of that length at every ``_STRIDE``-th offset:
wherever a secret occurs, exactly one of its indexed substrings starts at
such an offset. Only secrets whose key turns up are looked for, with ``in``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

MIN_SECRET_CHARS = 10
_KEY_CHARS = 8
# MIN_SECRET_CHARS >= _KEY_CHARS + _STRIDE - 1, so every secret has its
# _STRIDE keys.
_STRIDE = 3
# Lines are searched in chunks of about this many characters: the set of
# substrings of a chunk is what costs memory.
_CHUNK_CHARS = 256 * 1024
_MAX_LINE_IN_REPORT = 400

# Shapes that are secrets whoever made them.
SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("bcrypt hash", re.compile(r"\$2[abxy]\$\d\d\$[./A-Za-z0-9]{53}")),
    (
        "JWT",
        re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{16,}"),
    ),
    # No lookbehind: a literal start keeps the search fast; a match inside a
    # longer word is dropped in search().
    ("refresh token", re.compile(r"rt_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")),
)

# Message fields that carry secrets, anywhere in a request or response.
SECRET_FIELDS: Mapping[str, str] = {
    "password": "password",
    "current_password": "password",
    "new_password": "password",
    "password_hash": "password hash",
    "access_token": "access token",
    "refresh_token": "refresh token",
    "token": "token",
    "code": "code",
}
# Email verification and password reset codes: 8 characters, shorter than
# MIN_SECRET_CHARS, so kept apart and looked for as whole words of their
# alphabet, in any case (a person may type them in lower case).
CODE_KIND = "code"
_CODE_WORD = re.compile(r"(?<![A-Za-z0-9])[A-Za-z2-9]{8}(?![A-Za-z0-9])")
# Settings (and environment variables, upper-cased) that hold secrets.
SECRET_SETTINGS: Mapping[str, str] = {
    "jwt_private_key_pem": "signing key",
    "jwt_hs256_secret": "HS256 secret",
    "jwt_private_key": "signing key",
    "admin_password": "password",
}


@dataclass(frozen=True)
class Finding:
    kind: str
    secret: str
    source: str
    line: str

    def __str__(self) -> str:
        shown = self.secret if len(self.secret) <= 16 else f"{self.secret[:12]}..."
        line = self.line
        if len(line) > _MAX_LINE_IN_REPORT:
            line = line[:_MAX_LINE_IN_REPORT] + "..."
        return f"{self.kind} {shown!r} in a log line of {self.source}: {line}"


class SecretLedger:
    """The secrets the tests handled, indexed for the substring search."""

    def __init__(self) -> None:
        self._by_key: dict[str, list[tuple[str, str]]] = {}
        self._known: set[str] = set()
        self._codes: set[str] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._known)

    def add(self, kind: str, value: str | bytes | None) -> None:
        """Remember ``value`` as a secret of ``kind``; too short ones are ignored."""
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if kind == CODE_KIND and value:
            with self._lock:
                self._codes.add(value.strip().upper())
            return
        if not value or len(value) < MIN_SECRET_CHARS:
            return
        with self._lock:
            if value in self._known:
                return
            self._known.add(value)
            end = len(value) - _KEY_CHARS
            for start in range(end - _STRIDE + 1, end + 1):
                self._by_key.setdefault(value[start : start + _KEY_CHARS], []).append((kind, value))
        if kind == "refresh token":
            self._add_refresh_token_hash(value)
        elif kind in ("signing key", "HS256 secret") and "-----BEGIN" in value:
            # The key material itself, one base64 line at a time, in case a
            # message quotes the key without its armour.
            for line in value.splitlines():
                if line and not line.startswith("-----"):
                    self.add(kind, line.strip())

    def _add_refresh_token_hash(self, token: str) -> None:
        # The service stores SHA-256 of the token's bytes; hex is how a
        # bytea would most likely reach a log line.
        from usersvc.services.sessions import parse_refresh_token

        presented = parse_refresh_token(token)
        if presented is not None:
            digest = presented.legacy_hash or presented.token_hash
            self.add("refresh token hash", digest.hex())
        self.add("refresh token hash", hashlib.sha256(token.encode()).hexdigest())

    def add_message(self, message: Any) -> None:
        """Add the secret fields of a protobuf message, nested ones included."""
        for descriptor, value in message.ListFields():
            if descriptor.type == descriptor.TYPE_MESSAGE:
                if descriptor.message_type.GetOptions().map_entry:
                    continue  # labels: string maps, nothing secret
                for item in value if descriptor.is_repeated else (value,):
                    self.add_message(item)
            elif descriptor.name in SECRET_FIELDS:
                kind = SECRET_FIELDS[descriptor.name]
                for item in value if descriptor.is_repeated else (value,):
                    self.add(kind, item)

    def add_metadata(self, metadata: Iterable[tuple[str, Any]] | None) -> None:
        """Add the bearer token of call metadata."""
        for key, value in metadata or ():
            if key == "authorization" and isinstance(value, str):
                scheme, _, token = value.partition(" ")
                self.add("access token", token if scheme.lower() == "bearer" else value)

    def add_settings(self, settings: Any) -> None:
        """Add the secrets of a usersvc Settings (keys, HS256 secret, a
        password in the database URLs)."""
        for name, kind in SECRET_SETTINGS.items():
            self.add(kind, getattr(settings, name, None))
        for name in ("database_url", "migration_database_url", "revocation_database_url"):
            self.add_url_password(getattr(settings, name, None))

    def add_environment(self, env: Mapping[str, str]) -> None:
        """Add the secrets of a usersvc process environment."""
        for name, kind in SECRET_SETTINGS.items():
            self.add(kind, env.get(f"USERSVC_{name.upper()}"))
        for name, value in env.items():
            if name.startswith("USERSVC_") and name.endswith("DATABASE_URL"):
                self.add_url_password(value)

    def add_url_password(self, url: str | None) -> None:
        if url:
            from sqlalchemy.engine import make_url

            self.add("database password", make_url(url).password)

    def search(self, text: str) -> Iterator[tuple[str, str]]:
        """(kind, secret) for each known secret in ``text``, then for each
        secret-shaped string."""
        width = _KEY_CHARS
        grams = {text[i : i + width] for i in range(0, len(text) - width + 1, _STRIDE)}
        with self._lock:
            candidates = [self._by_key[key] for key in grams.intersection(self._by_key)]
        seen: set[str] = set()
        for bucket in candidates:
            for kind, secret in bucket:
                if secret not in seen and secret in text:
                    seen.add(secret)
                    yield kind, secret
        if self._codes:
            for match in _CODE_WORD.finditer(text):
                if match.group(0).upper() in self._codes:
                    yield CODE_KIND, match.group(0)
        for kind, pattern in SHAPES:
            for match in pattern.finditer(text):
                before = text[match.start() - 1 : match.start()]
                if kind == "refresh token" and before and (before.isalnum() or before in "_-"):
                    continue
                yield kind, match.group(0)


@dataclass(frozen=True)
class CapturedLine:
    source: str
    text: str


class CapturingHandler(logging.Handler):
    """Keeps every record as the service's JSON and text formatters write it,
    with the request id stamped as the production handler does."""

    def __init__(self, sweep: LogSweep) -> None:
        super().__init__(logging.DEBUG)
        from usersvc.logging_setup import JsonFormatter, RequestIdFilter, TextFormatter

        self._sweep = sweep
        self._json = JsonFormatter()
        self._text = TextFormatter()
        self.addFilter(RequestIdFilter())

    def emit(self, record: logging.LogRecord) -> None:
        if not self._sweep.active:
            return
        try:
            lines = (self._json.format(record), self._text.format(record))
        except Exception as exc:  # the capture must never break a test's logging
            lines = (f"unformattable record {record.name}: {exc!r} {record.__dict__!r}",)
        source = f"{self._sweep.source} ({record.name})"
        for line in lines:
            self._sweep.add_line(source, line)


class LogSweep:
    """Captured log lines, and the ledger to check them against."""

    def __init__(self, ledger: SecretLedger | None = None) -> None:
        self.ledger = ledger or SecretLedger()
        self.lines: list[CapturedLine] = []
        self.active = False
        self.source = "between tests"
        self._lock = threading.Lock()
        self._handler: CapturingHandler | None = None
        self._saved_level: int | None = None
        # What the searches cost, for the session summary.
        self.search_seconds = 0.0

    def add_line(self, source: str, text: str) -> None:
        with self._lock:
            self.lines.append(CapturedLine(source, text))

    def add_text(self, source: str, text: str | bytes) -> None:
        """Add a subprocess's output (stderr, a log file), line by line."""
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        for line in text.splitlines():
            if line.strip():
                self.add_line(source, line)

    def start(self, source: str, logger: logging.Logger | None = None) -> None:
        """Capture from now on, attributing lines to ``source``. Opens the
        logger (root by default) to DEBUG: a line the service would write
        only at a verbose level must be clean too."""
        target = logger or logging.getLogger()
        if self._handler is None:
            self._handler = CapturingHandler(self)
            target.addHandler(self._handler)
            self._saved_level = target.level
        target.setLevel(logging.DEBUG)
        self.source = source
        self.active = True

    def pause(self, logger: logging.Logger | None = None) -> None:
        """Stop capturing: the handler leaves, the logger gets its level back."""
        self.active = False
        self.source = "between tests"
        target = logger or logging.getLogger()
        if self._handler is not None:
            target.removeHandler(self._handler)
            self._handler = None
        if self._saved_level is not None:
            target.setLevel(self._saved_level)
            self._saved_level = None

    def close(self, logger: logging.Logger | None = None) -> None:
        self.pause(logger)

    def findings(self, since: int = 0) -> list[Finding]:
        """One Finding per secret per line, for lines[since:]."""
        started = time.perf_counter()
        with self._lock:
            lines = self.lines[since:]
        found: list[Finding] = []
        for chunk in _chunks(lines):
            text = "\n".join(line.text for line in chunk)
            hits = set(self.ledger.search(text))
            if not hits:
                continue
            for line in chunk:
                for kind, secret in hits:
                    if secret in line.text:
                        found.append(Finding(kind, secret, line.source, line.text))
        self.search_seconds += time.perf_counter() - started
        return found


def _chunks(lines: list[CapturedLine]) -> Iterator[list[CapturedLine]]:
    chunk: list[CapturedLine] = []
    size = 0
    for line in lines:
        chunk.append(line)
        size += len(line.text) + 1
        if size >= _CHUNK_CHARS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class SecretHarvester(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """A client interceptor that adds to ``ledger`` the bearer token of each
    call, the secret fields of each request and of each response."""

    def __init__(self, ledger: SecretLedger) -> None:
        self._ledger = ledger

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        self._ledger.add_metadata(client_call_details.metadata)
        if hasattr(request, "ListFields"):
            self._ledger.add_message(request)
        call = await continuation(client_call_details, request)
        try:
            response = await call
        except grpc.aio.AioRpcError:
            return call  # awaiting it again re-raises the error to the caller
        if hasattr(response, "ListFields"):
            self._ledger.add_message(response)
        return call


# The e2e tier's sweep: one per test session.
SWEEP = LogSweep()
