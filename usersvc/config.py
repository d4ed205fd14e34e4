"""Settings: every USERSVC_* variable declared once, read once, validated,
passed in.

Each field of ``Settings`` is one variable. Its declaration (``integer(...)``,
``text(...)``, ``secret(...)`` ...) holds the type, default, bounds and
meaning; ``Settings.from_env`` reads every declared variable from it, and
``python -m usersvc.config --markdown`` writes docs/configuration.md from it
(a unit test fails when the committed file is stale). Adding a variable is
adding one field, e.g.::

    code_ttl_seconds: int = integer(
        600, lo=60, hi=86_400, doc="lifetime of verification and reset codes"
    )

and regenerating docs/configuration.md. The variable's name is the field's,
upper-cased, after ``USERSVC_`` (``env=`` when it differs). Secrets are
declared with ``secret(...)``: no default, kept out of ``repr``, never
repeated in a message. Rules across variables are ``_cross_checks``.

Nothing here runs at import. ``from_env`` collects every problem and raises
one ``SettingsError`` listing them all, so a bad deployment fails at start
(``usersvc`` exits 2) with every bad variable named, instead of at the first
call.

Why a declaration of our own and not pydantic-settings: start-up cost.
Every ``usersvc`` process imports this module first: the supervisor of
``serve --workers N`` (which must stay light and never imports grpc), each
worker, and ``usersvc healthcheck``, which a container runs every few
seconds. Measured on the 2-core development machine shared with other work
(Python 3.11, pydantic-settings 2.16.3 with pydantic 2.14, medians of 15
fresh interpreters, interleaved; usersvc.domain.models included in each):

    python -X importtime, cumulative     median   min
    this module (declared once)           37 ms   25 ms
    the former dataclass + from_env       36 ms   24 ms
    the same fields as BaseSettings      229 ms  144 ms

    wall time of a whole process         median   min
    usersvc healthcheck (no server)      209 ms  169 ms
      the same, + BaseSettings           374 ms  292 ms
    supervisor's imports + from_env      134 ms  101 ms
      the same, + BaseSettings           257 ms  225 ms

So pydantic-settings would cost about 150 ms per process start (80% more
per health check) and five more dependencies (pydantic-core compiled), for
what this module does in a few hundred lines. (This module also keeps
``typing`` out of the start: it was a tenth of its import time.)
"""

from __future__ import annotations

import ipaddress
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

from usersvc.domain.keys import MIN_HS256_SECRET_BYTES
from usersvc.domain.models import KNOWN_ROLES

# Not typing.TYPE_CHECKING: typing itself would be the costliest import here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")
    # Turns the variable's text into its value, or appends what is wrong
    # to the problems and returns _INVALID (the default is kept then).
    Parser = Callable[[str, str, list[str]], Any]

PREFIX = "USERSVC_"
JWT_ALGORITHMS = ("EdDSA", "HS256")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
DATABASE_SCHEME = "postgresql+asyncpg://"

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class SettingsError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask where the platform
    has one (a container's cpuset), else os.cpu_count(); at least 1. Raises
    nothing."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_bcrypt_threads() -> int:
    """The default of USERSVC_BCRYPT_MAX_THREADS: usable CPUs minus one, at
    least one. On 2 cores, two bcrypt threads left the event loop no core
    during a login flood (GetUser p99 17x its idle value). Raises nothing."""
    return max(1, usable_cpus() - 1)


def normalize_identity(identity: str) -> str:
    """The form service identities are compared in: DNS names are
    case-insensitive, so they are lower-cased; URIs are kept as they are.
    Raises nothing."""
    return identity if "://" in identity else identity.lower()


def split_host_port(addr: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` too) as (host without brackets, port);
    None when it is not one. Raises nothing."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- declarations

_INVALID: Any = object()


@dataclass(frozen=True)
class Check:
    """A rule beyond the type: ``test`` returns what is wrong with a value
    (to follow the variable's name) or None; ``rule`` documents it."""

    rule: str
    test: Callable[[Any], str | None]


@dataclass(frozen=True)
class Variable:
    """How one USERSVC_* variable is read, checked and documented."""

    type: str
    parse: Parser
    doc: str
    lo: int | float | None = None
    hi: int | float | None = None
    choices: tuple[str, ...] = ()
    check: Check | None = None
    # What leaving it unset means, when the default is not a plain value
    # (None, or computed at start).
    unset: str = ""
    secret: bool = False
    # Taken as given, spaces included: stripping would silently shorten a secret.
    verbatim: bool = False
    # The name after USERSVC_ when it is not the field's name upper-cased.
    env: str = ""

    def read(self, raw: str | None, name: str, problems: list[str]) -> Any:
        """The value of ``raw`` (_INVALID when unset, blank or bad; bad
        values append to ``problems``). Raises nothing."""
        if raw is None:
            return _INVALID
        given = raw if self.verbatim else raw.strip()
        if given == "":
            return _INVALID
        value = self.parse(given, name, problems)
        if value is _INVALID:
            return value
        # Out of bounds is reported, and the value kept, so that checks
        # across variables judge what was asked for.
        if self.lo is not None and self.hi is not None and not self.lo <= value <= self.hi:
            problems.append(f"{name} must be between {self.lo} and {self.hi}, got {value}")
        if self.check is not None:
            problem = self.check.test(value)
            if problem is not None:
                problems.append(f"{name} {problem}")
        return value


_METADATA_KEY = "usersvc.variable"


def _declare(variable: Variable, default: T) -> T:
    return field(default=default, metadata={_METADATA_KEY: variable}, repr=not variable.secret)


def _computed(variable: Variable, factory: Callable[[], T], *, hashed: bool = True) -> T:
    """A default computed when Settings is made (at start)."""
    metadata = {_METADATA_KEY: variable}
    return field(default_factory=factory, metadata=metadata, hash=None if hashed else False)


def _parse_integer(text: str, name: str, problems: list[str]) -> Any:
    try:
        return int(text)
    except ValueError:
        problems.append(f"{name} must be an integer, got {text!r}")
        return _INVALID


def _parse_number(text: str, name: str, problems: list[str]) -> Any:
    try:
        return float(text)
    except ValueError:
        problems.append(f"{name} must be a number, got {text!r}")
        return _INVALID


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _parse_boolean(text: str, name: str, problems: list[str]) -> Any:
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    problems.append(f"{name} must be true or false, got {text!r}")
    return _INVALID


def _parse_text(text: str, name: str, problems: list[str]) -> Any:
    return text


def _parse_path(text: str, name: str, problems: list[str]) -> Any:
    return Path(text)


def _parse_paths(text: str, name: str, problems: list[str]) -> Any:
    return tuple(Path(part.strip()) for part in text.split(",") if part.strip())


def _parse_networks(text: str, name: str, problems: list[str]) -> Any:
    networks: list[IPNetwork] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            problems.append(f"{name}: {part!r} is not an IP address or CIDR network")
    return tuple(networks)


def _parse_identities(text: str, name: str, problems: list[str]) -> Any:
    found: dict[str, frozenset[str]] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        # The last "=" splits: roles never contain one, a URI might.
        identity, sep, roles_text = entry.rpartition("=")
        identity = normalize_identity(identity.strip())
        roles = frozenset(filter(None, (r.strip() for r in roles_text.split("+"))))
        if not sep or not identity or not roles:
            problems.append(f"{name}: expected identity=role+role, got {entry!r}")
            continue
        unknown = sorted(roles - KNOWN_ROLES)
        if unknown:
            problems.append(
                f"{name}: unknown role(s) {', '.join(unknown)} for {identity!r} "
                f"(known: {', '.join(sorted(KNOWN_ROLES))})"
            )
        if identity in found:
            problems.append(f"{name}: {identity!r} is listed twice")
        found[identity] = roles
    return found


def _choice_parser(choices: tuple[str, ...]) -> Parser:
    def parse(text: str, name: str, problems: list[str]) -> Any:
        for option in choices:
            if text.lower() == option.lower():
                return option
        problems.append(f"{name} must be one of {', '.join(choices)}, got {text!r}")
        return _INVALID

    return parse


def _host_port(addr: str) -> str | None:
    return None if split_host_port(addr) is not None else f"must be host:port, got {addr!r}"


def _database_url(url: str) -> str | None:
    if url.startswith(DATABASE_SCHEME):
        return None
    return f"must start with {DATABASE_SCHEME} (SQLAlchemy URL for the asyncpg driver)"


def _redis_url(url: str) -> str | None:
    if url.startswith(REDIS_SCHEMES):
        return None
    return f"must start with one of {', '.join(REDIS_SCHEMES)}"


IS_HOST_PORT = Check("host:port", _host_port)
IS_ASYNCPG_URL = Check(f"`{DATABASE_SCHEME}...`", _database_url)
IS_REDIS_URL = Check(", ".join(f"`{s}...`" for s in REDIS_SCHEMES), _redis_url)


def _stream_name(name: str) -> str | None:
    # NATS refuses these in a stream name.
    if any(ch in name for ch in " \t.*>/\\"):
        return f"must be a NATS stream name (no spaces, '.', '*', '>', '/'), got {name!r}"
    return None


IS_STREAM_NAME = Check("a NATS stream name: no spaces, `.`, `*`, `>`, `/`", _stream_name)


def integer(
    default: int | Callable[[], int], *, lo: int, hi: int, doc: str, unset: str = "", env: str = ""
) -> int:
    """An integer from ``lo`` to ``hi``. A callable default is computed at
    start; ``unset`` then says how."""
    variable = Variable("integer", _parse_integer, doc, lo=lo, hi=hi, unset=unset, env=env)
    if callable(default):
        return _computed(variable, default)
    return _declare(variable, default)


def number(default: float, *, lo: float, hi: float, doc: str, env: str = "") -> float:
    """A decimal number from ``lo`` to ``hi``."""
    return _declare(Variable("number", _parse_number, doc, lo=lo, hi=hi, env=env), default)


def boolean(default: bool, *, doc: str, env: str = "") -> bool:
    """true/false, 1/0, yes/no, on/off."""
    return _declare(Variable("boolean", _parse_boolean, doc, env=env), default)


def choice(default: str, choices: tuple[str, ...], *, doc: str, env: str = "") -> str:
    """One of ``choices``, in any case; the value is spelled as declared."""
    variable = Variable("choice", _choice_parser(choices), doc, choices=choices, env=env)
    return _declare(variable, default)


def text(default: T, *, doc: str, check: Check | None = None, unset: str = "", env: str = "") -> T:
    """A string, surrounding spaces stripped; a default of None means unset
    (``unset`` says what that means)."""
    kind = "host:port" if check is IS_HOST_PORT else "string"
    return _declare(Variable(kind, _parse_text, doc, check=check, unset=unset, env=env), default)


def secret(
    *, doc: str, check: Check | None = None, unset: str = "", verbatim: bool = False, env: str = ""
) -> str | None:
    """A secret string: never a default, never in repr or in a message."""
    variable = Variable(
        "string, secret",
        _parse_text,
        doc,
        check=check,
        unset=unset,
        secret=True,
        verbatim=verbatim,
        env=env,
    )
    return _declare(variable, None)


def path(default: T, *, doc: str, unset: str = "", env: str = "") -> T:
    """A file or directory path; a default of None means unset."""
    return _declare(Variable("path", _parse_path, doc, unset=unset, env=env), default)


def paths(*, doc: str, env: str = "") -> tuple[Path, ...]:
    """A comma-separated list of paths; empty by default."""
    return _declare(Variable("paths, comma-separated", _parse_paths, doc, env=env), ())


def networks(*, doc: str, env: str = "") -> tuple[IPNetwork, ...]:
    """A comma-separated list of IP addresses and CIDR networks; empty by default."""
    variable = Variable("IPs and CIDRs, comma-separated", _parse_networks, doc, env=env)
    return _declare(variable, ())


def identities(*, doc: str, env: str = "") -> Mapping[str, frozenset[str]]:
    """``identity=role+role;identity=role``, e.g.
    ``spiffe://corp/billing=service;orders.internal=service+admin``; empty by
    default. Left out of the hash (a dict has none), so Settings stays hashable."""
    variable = Variable("identity=role+role;...", _parse_identities, doc, env=env)
    return _computed(variable, dict, hashed=False)


# ------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    # -- database
    database_url: str | None = secret(
        doc="SQLAlchemy URL `postgresql+asyncpg://user:pass@host:5432/db`; add `?ssl=require` "
        "(or `verify-full`) for TLS to PostgreSQL",
        check=IS_ASYNCPG_URL,
        unset="embedded PostgreSQL under `USERSVC_DATA_DIR` (development)",
    )
    migration_database_url: str | None = secret(
        doc="URL `usersvc migrate` uses (the schema owner)",
        check=IS_ASYNCPG_URL,
        unset="the value of `USERSVC_DATABASE_URL`",
    )
    revocation_database_url: str | None = secret(
        doc="URL of the revocation listener's LISTEN connection (LISTEN needs a session of its "
        "own): PostgreSQL itself or a session-mode pool, never a transaction pool; required "
        "with `USERSVC_DB_TRANSACTION_POOLING`",
        check=IS_ASYNCPG_URL,
        unset="the value of `USERSVC_DATABASE_URL`",
    )
    db_transaction_pooling: bool = boolean(
        False,
        doc="`USERSVC_DATABASE_URL` goes through a transaction-mode pool (PgBouncer "
        "`pool_mode=transaction`): no statement caches, unnamed statements, no session state "
        "such as a startup `statement_timeout`",
    )
    db_pool_size: int = integer(
        20,
        lo=1,
        hi=1000,
        doc="connections kept once opened, per process (opened as calls need them, up to this)",
    )
    db_max_overflow: int = integer(
        0,
        lo=0,
        hi=1000,
        doc="extra connections under bursts, per process, closed again as each comes back "
        "(every burst then pays new connections: keep it 0 and size the pool instead)",
    )
    db_pool_timeout_seconds: float = number(
        5.0, lo=0.1, hi=600, doc="wait for a free connection before failing the call"
    )
    db_pool_pre_ping: bool = boolean(
        True,
        doc="test a pooled connection before use with one `SELECT 1` round trip (survives "
        "database restarts); the read and write lanes skip it (a read is retried once, a "
        "write goes to a fresh connection when its pooled one is known closed)",
    )
    db_pool_recycle_seconds: int = integer(
        1800, lo=-1, hi=86_400, doc="replace connections older than this (`-1`: never)"
    )
    db_statement_timeout_ms: int = integer(
        5000,
        lo=0,
        hi=3_600_000,
        doc="server-side `statement_timeout` of every connection of the service (`0`: none)",
    )
    db_probe_interval_seconds: float = number(
        0.5,
        lo=0,
        hi=3600,
        doc="period of the database probe, on a connection of its own: while it fails, calls "
        "fail fast and health is NOT_SERVING (`0`: no probe, no fast failure)",
    )
    db_probe_timeout_seconds: float = number(
        1.0,
        lo=0.01,
        hi=600,
        doc="a probe slower than this is late; a refused connection counts as the database "
        "being down at once, late probes only after 10 s of them in a row",
    )

    # -- server
    listen_addr: str = text(
        "127.0.0.1:50051",
        check=IS_HOST_PORT,
        doc="host:port to serve gRPC on (`0.0.0.0:50051` in a container)",
    )
    shutdown_grace_seconds: float = number(
        10.0, lo=0, hi=3600, doc="how long in-flight calls may finish after SIGTERM"
    )
    shutdown_drain_seconds: float = number(
        0.0,
        lo=0,
        hi=3600,
        doc="after SIGTERM: health NOT_SERVING at once, but new calls still served this long "
        "(for balancers and health-checking clients to move away), then new calls refused "
        "and the grace period begins; set it in Kubernetes",
    )
    deadline_margin_ms: int = integer(
        50,
        lo=0,
        hi=60_000,
        doc="a call with a deadline is given up this long before it, so the caller still "
        "receives DEADLINE_EXCEEDED with its details; a call arriving with less left is not "
        "started",
    )
    # Not a variable: the gRPC message size limit of both directions.
    max_message_bytes: int = 1024 * 1024
    max_concurrent_rpcs: int = integer(
        1000,
        lo=1,
        hi=1_000_000,
        doc="calls served at once per process, counted once their request message has "
        "arrived (health checks and long-lived streams have caps of their own); any call "
        "beyond it gets RESOURCE_EXHAUSTED `OVERLOADED` at once, so a flood is shed instead "
        "of piling up",
    )
    max_open_streams: int = integer(
        100,
        lo=1,
        hi=100_000,
        doc="long-lived response streams (`Health/Watch`) open at once per process; more "
        "get RESOURCE_EXHAUSTED `OVERLOADED`",
    )
    max_reflection_streams: int = integer(
        4,
        lo=0,
        hi=10_000,
        doc="server reflection streams open at once per process (`0`: reflection refused)",
    )
    request_message_timeout_seconds: float = number(
        10.0,
        lo=0.1,
        hi=3600,
        doc="a request message (each one, on a stream) that has not arrived this long after "
        "the call started or the previous message ends the call with DEADLINE_EXCEEDED",
    )
    max_streams_per_connection: int = integer(
        1000,
        lo=1,
        hi=100_000,
        doc="concurrent calls per HTTP/2 connection (`grpc.max_concurrent_streams`); a client "
        "queues the calls beyond it, but a burst beyond it on a new connection may get "
        "UNAVAILABLE",
    )
    max_metadata_bytes: int = integer(
        8192,
        lo=1024,
        hi=65_536,
        doc="request headers (metadata) larger than this are refused with RESOURCE_EXHAUSTED "
        "by gRPC, always (soft and hard limit alike)",
    )
    keepalive_min_ping_interval_ms: int = integer(
        10_000,
        lo=0,
        hi=3_600_000,
        doc="pings closer together than this count as a strike "
        "(`grpc.http2.min_ping_interval_without_data_ms`); clients' keepalive time must be "
        "at least this",
    )
    keepalive_max_ping_strikes: int = integer(
        2,
        lo=0,
        hi=1000,
        doc="strikes after which a connection is closed with GOAWAY ENHANCE_YOUR_CALM (`0`: never)",
    )
    keepalive_permit_without_calls: bool = boolean(
        True, doc="accept keepalive pings on a connection with no call in progress"
    )
    max_connection_idle_seconds: float = number(
        300.0,
        lo=0,
        hi=86_400,
        doc="close a connection (GOAWAY) after this long without any call in progress (`0`: never)",
    )
    max_connection_age_seconds: float = number(
        1800.0,
        lo=0,
        hi=604_800,
        doc="close a connection (GOAWAY) after this long, ±10 % jitter, so clients "
        "rebalance and no connection lives for ever (`0`: never)",
    )
    max_connection_age_grace_seconds: float = number(
        30.0,
        lo=0,
        hi=86_400,
        doc="calls still running on a connection past its age get this long before it is "
        "cut (long-lived streams reconnect)",
    )
    workers: int = integer(
        1,
        lo=1,
        hi=256,
        doc="server processes sharing the port(s) through SO_REUSEPORT, each with its own "
        "connection pool (`usersvc serve --workers N` overrides it); needs fixed ports",
    )
    metrics_addr: str | None = text(
        None,
        check=IS_HOST_PORT,
        doc="host:port of the Prometheus `/metrics` endpoint (`0.0.0.0:9090` in a container)",
        unset="no metrics",
    )
    tls_cert_file: Path | None = path(
        None,
        doc="serve TLS with this certificate chain (PEM); needs `USERSVC_TLS_KEY_FILE`",
        unset="plaintext",
    )
    tls_key_file: Path | None = path(
        None, doc="the private key (PEM) of `USERSVC_TLS_CERT_FILE`", unset="plaintext"
    )
    tls_client_ca_file: Path | None = path(
        None,
        doc="CA whose client certificates authenticate services (mTLS): required on "
        "`USERSVC_MTLS_LISTEN_ADDR` when that is set, otherwise on `USERSVC_LISTEN_ADDR` "
        "itself (gRPC cannot ask for an optional one)",
        unset="no client certificates",
    )
    mtls_listen_addr: str | None = text(
        None,
        check=IS_HOST_PORT,
        doc="a second host:port that requires client certificates, while "
        "`USERSVC_LISTEN_ADDR` keeps serving bearer-token callers over TLS",
        unset="no second port",
    )
    service_identities: Mapping[str, frozenset[str]] = identities(
        doc="certificate identity (URI SAN or DNS name) to roles of that service, e.g. "
        "`spiffe://corp/billing=service;orders.internal=service+admin`; needs "
        "`USERSVC_TLS_CLIENT_CA_FILE`",
    )

    # -- users and passwords
    allow_signup: bool = boolean(
        True, doc='unauthenticated CreateUser allowed (roles then empty or `["user"]`)'
    )
    bcrypt_rounds: int = integer(
        12,
        lo=4,
        hi=16,
        doc="bcrypt cost; stored hashes of another cost are re-hashed at this one at the "
        "next login",
    )
    bcrypt_max_threads: int = integer(
        # Looked up at each call, so that tests may replace usable_cpus.
        lambda: default_bcrypt_threads(),
        lo=1,
        hi=256,
        unset="usable CPUs (affinity mask) minus 1, at least 1",
        doc="threads hashing passwords: bcrypt never runs on the event loop, and one CPU is "
        "left to it",
    )
    bcrypt_nice: int = integer(
        10,
        lo=0,
        hi=19,
        doc="added to the bcrypt threads' nice value (Linux: per thread), so that under "
        "contention the event loop and PostgreSQL get the CPU first",
    )

    # -- tokens and sessions
    access_token_ttl_seconds: int = integer(900, lo=30, hi=86_400, doc="access token lifetime")
    refresh_token_ttl_seconds: int = integer(
        2_592_000,
        lo=60,
        hi=31_622_400,
        doc="absolute session lifetime from the login (refreshing does not extend it), at "
        "least the access token lifetime; 30 days by default",
    )
    session_cleanup_interval_seconds: float = number(
        300.0,
        lo=0,
        hi=86_400,
        doc="how often each process deletes expired sessions, refresh tokens and revocation "
        "entries (`0`: never, by this process)",
    )
    code_ttl_seconds: int = integer(
        600,
        lo=60,
        hi=86_400,
        doc="lifetime of email verification and password reset codes",
    )
    jwt_issuer: str = text("usersvc", doc="`iss` of issued tokens, required on verification")
    jwt_audience: str = text("usersvc", doc="`aud` of issued tokens, required on verification")
    jwt_private_key_pem: str | None = secret(
        env="JWT_PRIVATE_KEY",
        doc="Ed25519 signing key, PEM (PKCS#8), inline; not with `USERSVC_JWT_PRIVATE_KEY_FILE`",
        unset="see `USERSVC_JWT_PRIVATE_KEY_FILE`",
    )
    jwt_private_key_file: Path | None = path(
        None,
        doc="Ed25519 signing key, PEM (PKCS#8), from a file",
        unset="in development a key is generated into `USERSVC_DATA_DIR/jwt-ed25519.pem` "
        "(with a warning); production refuses to start",
    )
    jwt_algorithm: str = choice(
        "EdDSA",
        JWT_ALGORITHMS,
        doc="`EdDSA` signs with the Ed25519 key (verifiable offline with GetJwks); `HS256` with "
        "`USERSVC_JWT_HS256_SECRET` (nothing to publish in GetJwks then)",
    )
    jwt_hs256_secret: str | None = secret(
        verbatim=True,
        doc=f"the HS256 secret, at least {MIN_HS256_SECRET_BYTES} bytes, taken verbatim "
        "(`openssl rand -base64 48` makes one); only with `USERSVC_JWT_ALGORITHM=HS256`",
    )
    jwt_verification_key_files: tuple[Path, ...] = paths(
        doc="PEM files (public or private Ed25519 keys) that only verify, e.g. the previous "
        "signing key during a rotation; all are published by GetJwks",
    )

    # -- brute force and rate limits
    login_max_failures: int = integer(
        5, lo=1, hi=1000, doc="consecutive failed logins before a temporary lock"
    )
    login_lockout_seconds: int = integer(
        60, lo=1, hi=86_400, doc="first lock length; doubles on each repeat lock"
    )
    login_lockout_max_seconds: int = integer(
        3600,
        lo=1,
        hi=2_592_000,
        doc="cap on the lock length; not below `USERSVC_LOGIN_LOCKOUT_SECONDS`",
    )
    rate_limit_rps: float = number(
        100.0,
        lo=0,
        hi=1_000_000,
        doc="token bucket per caller: requests a second refilled (`0`: no limit)",
    )
    rate_limit_burst: int = integer(
        200, lo=1, hi=1_000_000, doc="token bucket per caller: its size"
    )
    auth_rate_limit_rps: float = number(
        5.0,
        lo=0,
        hi=1_000_000,
        doc="the stricter bucket that replaces the general one for calls that run bcrypt or "
        "tell whether an email is registered (Login, CreateUser, BatchCreateUsers, an "
        "UpdateUser of the email, ChangePassword), per caller and per account aimed at: "
        "requests a second (`0`: no limit)",
    )
    auth_rate_limit_burst: int = integer(10, lo=1, hi=1_000_000, doc="the stricter bucket's size")
    trusted_proxies: tuple[IPNetwork, ...] = networks(
        doc="direct peers whose `x-forwarded-for` is believed"
    )
    redis_url: str | None = secret(
        check=IS_REDIS_URL,
        doc="Redis that shares the rate limit buckets between processes and replicas",
        unset="buckets per process",
    )
    redis_timeout_seconds: float = number(
        0.1,
        lo=0.001,
        hi=60,
        doc="connect and socket timeout for Redis: bounds what a slow or unreachable Redis "
        "adds to a call",
    )

    # -- events (docs/events.md)
    nats_url: str | None = secret(
        doc="NATS server for publishing events (JetStream)",
        unset="events are kept and served by EventService, not published",
    )
    nats_stream: str = text(
        "USERSVC_EVENTS",
        check=IS_STREAM_NAME,
        doc="JetStream stream the events go to (created when missing, subjects `usersvc.>`)",
    )
    event_source: str = text("usersvc", doc="CloudEvents `ce-source` of published events")
    event_retention_days: int = integer(
        90, lo=1, hi=36_500, doc="how long events are kept (never deleted before published)"
    )
    event_publish_window: int = integer(
        256,
        lo=1,
        hi=10_000,
        doc="events the relay publishes ahead of their JetStream PubAcks: it publishes about "
        "this many per round trip to NATS (raise it for a distant NATS)",
    )
    event_publish_timeout_seconds: float = number(
        2.0,
        lo=0.1,
        hi=60,
        doc="how long the relay waits for a PubAck before it publishes again, in order, from "
        "the first unacknowledged event",
    )

    # -- operations
    environment: str = choice(
        "development",
        ("development", "production"),
        env="ENV",
        doc="`production` refuses to start without `USERSVC_DATABASE_URL` and a signing key "
        "(no embedded database, no generated key)",
    )
    data_dir: Path = path(
        Path(".usersvc"),
        doc="embedded database and development key (relative: to the working directory)",
    )
    log_format: str = choice(
        "json", ("json", "text"), doc="`json` (one object per line on stderr) or `text`"
    )
    log_level: str = choice(
        "INFO", ("DEBUG", "INFO", "WARNING", "ERROR"), doc="threshold of the log"
    )

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Raises SettingsError naming every invalid variable."""
        env = os.environ if environ is None else environ
        problems: list[str] = []
        values: dict[str, Any] = {}
        for name, attribute, variable in declared():
            value = variable.read(env.get(name), name, problems)
            if value is not _INVALID:
                values[attribute] = value
        settings = cls(**values)
        problems += settings._cross_checks()
        if problems:
            raise SettingsError(problems)
        return settings

    def _cross_checks(self) -> list[str]:
        problems = []
        if self.db_transaction_pooling and self.revocation_database_url is None:
            problems.append(
                f"{PREFIX}DB_TRANSACTION_POOLING=true requires {PREFIX}REVOCATION_DATABASE_URL: "
                "LISTEN does not work through a transaction pool; point it at PostgreSQL "
                "itself or at a session-mode pool"
            )
        if self.login_lockout_max_seconds < self.login_lockout_seconds:
            problems.append(
                f"{PREFIX}LOGIN_LOCKOUT_MAX_SECONDS ({self.login_lockout_max_seconds}) must not "
                f"be shorter than {PREFIX}LOGIN_LOCKOUT_SECONDS ({self.login_lockout_seconds})"
            )
        problems += self.worker_checks(self.workers)
        if self.jwt_private_key_pem and self.jwt_private_key_file:
            problems.append(
                f"set only one of {PREFIX}JWT_PRIVATE_KEY and {PREFIX}JWT_PRIVATE_KEY_FILE"
            )
        problems += self._key_checks() + self._tls_checks()
        if self.refresh_token_ttl_seconds < self.access_token_ttl_seconds:
            problems.append(
                f"{PREFIX}REFRESH_TOKEN_TTL_SECONDS ({self.refresh_token_ttl_seconds}) must "
                f"not be shorter than {PREFIX}ACCESS_TOKEN_TTL_SECONDS "
                f"({self.access_token_ttl_seconds})"
            )
        if self.is_production:
            if self.jwt_algorithm == "EdDSA" and not (
                self.jwt_private_key_pem or self.jwt_private_key_file
            ):
                problems.append(
                    f"{PREFIX}ENV=production requires {PREFIX}JWT_PRIVATE_KEY or "
                    f"{PREFIX}JWT_PRIVATE_KEY_FILE (no generated keys in production)"
                )
            if self.database_url is None:
                problems.append(
                    f"{PREFIX}ENV=production requires {PREFIX}DATABASE_URL "
                    "(the embedded PostgreSQL is for development)"
                )
        return problems

    def worker_checks(self, workers: int) -> list[str]:
        """Problems with serving from ``workers`` processes (also for
        ``serve --workers``, which overrides USERSVC_WORKERS)."""
        if workers <= 1:
            return []
        problems = []
        # Every worker binds the same port: a port the kernel picks (0)
        # would differ from worker to worker.
        ports = (("LISTEN_ADDR", self.listen_addr), ("MTLS_LISTEN_ADDR", self.mtls_listen_addr))
        for name, addr in ports:
            parsed = None if addr is None else split_host_port(addr)
            if parsed is not None and parsed[1] == 0:
                problems.append(f"{PREFIX}{name} needs a fixed port with {workers} workers")
        return problems

    def _key_checks(self) -> list[str]:
        if self.jwt_algorithm != "HS256":
            if self.jwt_hs256_secret is not None:
                return [f"{PREFIX}JWT_HS256_SECRET is set but {PREFIX}JWT_ALGORITHM is not HS256"]
            return []
        problems = []
        if self.jwt_private_key_pem or self.jwt_private_key_file:
            problems.append(
                f"{PREFIX}JWT_ALGORITHM=HS256 signs with {PREFIX}JWT_HS256_SECRET; unset "
                f"{PREFIX}JWT_PRIVATE_KEY(_FILE) (an old Ed25519 key that must keep "
                f"verifying belongs in {PREFIX}JWT_VERIFICATION_KEY_FILES)"
            )
        if self.jwt_hs256_secret is None:
            problems.append(f"{PREFIX}JWT_ALGORITHM=HS256 requires {PREFIX}JWT_HS256_SECRET")
        else:
            size = len(self.jwt_hs256_secret.encode("utf-8"))
            if size < MIN_HS256_SECRET_BYTES:
                # The length is said, the secret never is.
                problems.append(
                    f"{PREFIX}JWT_HS256_SECRET must be at least {MIN_HS256_SECRET_BYTES} "
                    f"bytes, got {size} (generate one: openssl rand -base64 48)"
                )
        return problems

    def _tls_checks(self) -> list[str]:
        problems = []
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            problems.append(f"set both {PREFIX}TLS_CERT_FILE and {PREFIX}TLS_KEY_FILE, or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            problems.append(
                f"{PREFIX}TLS_CLIENT_CA_FILE requires {PREFIX}TLS_CERT_FILE and "
                f"{PREFIX}TLS_KEY_FILE (client certificates need TLS)"
            )
        if self.mtls_listen_addr is not None:
            if self.tls_client_ca_file is None:
                problems.append(f"{PREFIX}MTLS_LISTEN_ADDR requires {PREFIX}TLS_CLIENT_CA_FILE")
            if (
                self.mtls_listen_addr == self.listen_addr
                and split_host_port(self.mtls_listen_addr) is not None
                and not self.listen_addr.endswith(":0")
            ):
                problems.append(f"{PREFIX}MTLS_LISTEN_ADDR must differ from {PREFIX}LISTEN_ADDR")
        if self.service_identities and self.tls_client_ca_file is None:
            problems.append(
                f"{PREFIX}SERVICE_IDENTITIES requires {PREFIX}TLS_CLIENT_CA_FILE "
                "(identities come from verified client certificates)"
            )
        return problems


def declared() -> list[tuple[str, str, Variable]]:
    """Every declared variable, in declaration order, as (full variable
    name, Settings attribute, declaration). Raises nothing."""
    found = []
    for spec in fields(Settings):
        variable = spec.metadata.get(_METADATA_KEY)
        if variable is not None:
            found.append((PREFIX + (variable.env or spec.name.upper()), spec.name, variable))
    return found


def default_of(attribute: str) -> Any:
    """The default of a Settings attribute (a computed one is computed).
    Raises KeyError for an unknown attribute."""
    for spec in fields(Settings):
        if spec.name == attribute:
            if spec.default_factory is not MISSING:
                return spec.default_factory()
            return spec.default
    raise KeyError(attribute)


# ------------------------------------------------------------------------- documentation

# Read elsewhere, documented here so that docs/configuration.md lists every variable.
OTHER_VARIABLES = (
    (
        "USERSVC_ADMIN_PASSWORD",
        "password for `usersvc create-admin` (else it prompts); read by that command only",
    ),
    (
        "OTEL_*",
        "OpenTelemetry traces with the `otel` extra (`OTEL_TRACES_EXPORTER`, "
        "`OTEL_EXPORTER_OTLP_ENDPOINT`, ...), read by the OpenTelemetry SDK; an exporter "
        "usersvc does not ship stops `usersvc serve` with exit code 2 (see "
        "usersvc/observability/tracing.py)",
    ),
)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default_cell(attribute: str, variable: Variable) -> str:
    spec = next(spec for spec in fields(Settings) if spec.name == attribute)
    if spec.default_factory is not MISSING and variable.unset:
        return variable.unset  # computed at start
    value = default_of(attribute)
    if value is None or value in ((), {}):
        return f"unset: {variable.unset}" if variable.unset else "unset"
    return f"`{_shown(value)}`"


def markdown() -> str:
    """docs/configuration.md: every variable with its type, default, bounds
    and meaning, from the declarations above. Raises nothing."""
    lines = [
        "# Configuration",
        "",
        "<!-- Generated from usersvc/config.py by `python -m usersvc.config --markdown`;",
        "     edit the declarations there, then regenerate this file. -->",
        "",
        "Everything is read from the environment once, at start, and validated: a bad value "
        "stops the process with exit code 2 and a message naming every bad variable. A "
        "variable set to blanks counts as unset; values are stripped of surrounding spaces "
        "(secrets taken verbatim are not). Booleans accept `true/false/1/0/yes/no/on/off`; "
        "choices are matched in any case. Secrets have no default and never appear in logs "
        "or messages.",
        "",
        "| variable | type | default | bounds | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, attribute, variable in declared():
        default = _default_cell(attribute, variable)
        if variable.lo is not None and variable.hi is not None:
            bounds = f"{_shown(variable.lo)}..{_shown(variable.hi)}"
        elif variable.choices:
            bounds = ", ".join(f"`{option}`" for option in variable.choices)
        elif variable.check is not None:
            bounds = variable.check.rule
        else:
            bounds = ""
        row = (f"`{name}`", variable.type, default, bounds, variable.doc)
        lines.append("| " + " | ".join(_cell(cell) for cell in row) + " |")
    lines += ["", "Also read, outside these settings:", ""]
    lines += [f"- `{name}`: {doc}" for name, doc in OTHER_VARIABLES]
    return "\n".join(lines) + "\n"


def _main(argv: list[str]) -> int:
    if argv != ["--markdown"]:
        print("usage: python -m usersvc.config --markdown > docs/configuration.md", file=sys.stderr)
        return 2
    sys.stdout.write(markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
