"""Settings: read once from the environment, validated, passed in.

Nothing here runs at import. ``Settings.from_env()`` collects every problem and
raises one ``SettingsError`` listing them all, so a bad deployment fails at
start with a clear message instead of at the first call.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from usersvc.domain.keys import MIN_HS256_SECRET_BYTES
from usersvc.domain.models import KNOWN_ROLES

PREFIX = "USERSVC_"
JWT_ALGORITHMS = ("EdDSA", "HS256")
REDIS_SCHEMES = ("redis://", "rediss://", "unix://")

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


@dataclass(frozen=True)
class Settings:
    # Database. None means: start the embedded PostgreSQL under data_dir.
    database_url: str | None = field(default=None, repr=False)
    # Owner role for `usersvc migrate`; defaults to database_url.
    migration_database_url: str | None = field(default=None, repr=False)
    # The revocation listener's own connection (LISTEN needs a session of
    # its own: PostgreSQL itself or a session-mode pool, never a
    # transaction pool); defaults to database_url.
    revocation_database_url: str | None = field(default=None, repr=False)
    # database_url goes through a transaction-pooling proxy (PgBouncer
    # pool_mode=transaction): no named prepared statements, no session
    # state (usersvc.adapters.database.create_engine).
    db_transaction_pooling: bool = False
    db_pool_size: int = 10
    db_max_overflow: int = 10
    db_pool_timeout_seconds: float = 5.0
    db_pool_pre_ping: bool = True
    db_pool_recycle_seconds: int = 1800
    # Server-side statement_timeout for every connection of the service.
    db_statement_timeout_ms: int = 5000
    # The database monitor (usersvc.adapters.db_monitor): a probe every
    # interval on a connection of its own, answering within the timeout, or
    # the database counts as down (calls fail fast, health NOT_SERVING).
    # An interval of 0 turns the monitor off.
    db_probe_interval_seconds: float = 0.5
    db_probe_timeout_seconds: float = 1.0

    # Server.
    listen_addr: str = "127.0.0.1:50051"
    shutdown_grace_seconds: float = 10.0
    # A call with a deadline is given up this long before it, so the
    # caller still receives the DEADLINE_EXCEEDED status with its details.
    deadline_margin_ms: int = 50
    max_message_bytes: int = 1024 * 1024
    # Calls served at once (queued or running); grpc answers any call beyond
    # it with RESOURCE_EXHAUSTED at once, so a flood is shed instead of
    # piling up in memory and in front of the connection pool.
    max_concurrent_rpcs: int = 1000
    # Server processes sharing the gRPC port(s) through SO_REUSEPORT, each
    # with its own connection pool (usersvc.supervisor); 1 is one process.
    workers: int = 1
    # host:port of the Prometheus /metrics endpoint; None: no metrics at all.
    metrics_addr: str | None = None
    # TLS for the gRPC port(s): certificate chain and key (PEM). A client CA
    # turns on client certificates: on mtls_listen_addr when that is set,
    # otherwise required on listen_addr itself (grpc cannot ask for an
    # optional one; see usersvc/server.py).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    mtls_listen_addr: str | None = None
    # Certificate identity (SAN URI or DNS name) -> roles of that service.
    # Left out of the hash (a dict has none), so Settings stays hashable.
    service_identities: Mapping[str, frozenset[str]] = field(default_factory=dict, hash=False)

    # Users and passwords.
    allow_signup: bool = True
    bcrypt_rounds: int = 12
    # One CPU fewer than the process may use (at least one): bcrypt threads
    # never take every core from the event loop (see usersvc/services/passwords.py).
    bcrypt_max_threads: int = field(default_factory=lambda: default_bcrypt_threads())
    # Added to the bcrypt threads' nice value (Linux: per thread), so that
    # under contention the event loop and the database get the CPU first.
    bcrypt_nice: int = 10

    # Tokens.
    access_token_ttl_seconds: int = 900
    # Sessions: a login's refresh tokens work until this long after the
    # login (rotation does not extend it); expired sessions and revocation
    # log rows are deleted every cleanup interval (0: never, by this process).
    refresh_token_ttl_seconds: int = 2_592_000
    session_cleanup_interval_seconds: float = 300.0
    jwt_issuer: str = "usersvc"
    jwt_audience: str = "usersvc"
    # Ed25519 private key in PEM: inline, or a file. Neither: development
    # generates one under data_dir (production refuses to start).
    jwt_private_key_pem: str | None = field(default=None, repr=False)
    jwt_private_key_file: Path | None = None
    # EdDSA signs with the key above; HS256 with a shared secret instead
    # (nothing to publish in GetJwks then).
    jwt_algorithm: str = "EdDSA"
    jwt_hs256_secret: str | None = field(default=None, repr=False)
    # Ed25519 keys (PEM, public or private) that only verify: the previous
    # signing keys during a rotation.
    jwt_verification_key_files: tuple[Path, ...] = ()

    # Brute force: consecutive failed logins before an account is locked;
    # the first lock's length, doubled on each repeat up to the maximum
    # (usersvc.domain.lockout).
    login_max_failures: int = 5
    login_lockout_seconds: int = 60
    login_lockout_max_seconds: int = 3600

    # Rate limits: a token bucket per caller (usersvc.api.interceptors.
    # rate_limit); requests per second refilled and the bucket's size. 0 rps
    # turns a limit off. The auth bucket replaces the general one for Login
    # and anonymous CreateUser.
    rate_limit_rps: float = 100.0
    rate_limit_burst: int = 200
    auth_rate_limit_rps: float = 5.0
    auth_rate_limit_burst: int = 10
    # Direct peers whose x-forwarded-for is believed (IPs or CIDRs).
    trusted_proxies: tuple[IPNetwork, ...] = ()
    # Shares the buckets between replicas; None keeps them in process.
    redis_url: str | None = field(default=None, repr=False)
    # Bounds what a slow or unreachable Redis adds to a call.
    redis_timeout_seconds: float = 0.1

    # Operations.
    environment: str = "development"  # or "production"
    data_dir: Path = Path(".usersvc")
    log_format: str = "json"
    log_level: str = "INFO"

    @property
    def is_production(self) -> bool:
        return self.environment == "production"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Raises SettingsError naming every invalid variable."""
        env = os.environ if environ is None else environ
        reader = _Reader(env)
        defaults = cls()
        settings = cls(
            database_url=reader.text("DATABASE_URL", None),
            migration_database_url=reader.text("MIGRATION_DATABASE_URL", None),
            revocation_database_url=reader.text("REVOCATION_DATABASE_URL", None),
            db_transaction_pooling=reader.boolean(
                "DB_TRANSACTION_POOLING", defaults.db_transaction_pooling
            ),
            db_pool_size=reader.integer("DB_POOL_SIZE", defaults.db_pool_size, lo=1, hi=1000),
            db_max_overflow=reader.integer(
                "DB_MAX_OVERFLOW", defaults.db_max_overflow, lo=0, hi=1000
            ),
            db_pool_timeout_seconds=reader.number(
                "DB_POOL_TIMEOUT_SECONDS", defaults.db_pool_timeout_seconds, lo=0.1, hi=600
            ),
            db_pool_pre_ping=reader.boolean("DB_POOL_PRE_PING", defaults.db_pool_pre_ping),
            db_pool_recycle_seconds=reader.integer(
                "DB_POOL_RECYCLE_SECONDS", defaults.db_pool_recycle_seconds, lo=-1, hi=86_400
            ),
            db_statement_timeout_ms=reader.integer(
                "DB_STATEMENT_TIMEOUT_MS", defaults.db_statement_timeout_ms, lo=0, hi=3_600_000
            ),
            db_probe_interval_seconds=reader.number(
                "DB_PROBE_INTERVAL_SECONDS", defaults.db_probe_interval_seconds, lo=0, hi=3600
            ),
            db_probe_timeout_seconds=reader.number(
                "DB_PROBE_TIMEOUT_SECONDS", defaults.db_probe_timeout_seconds, lo=0.01, hi=600
            ),
            listen_addr=reader.text("LISTEN_ADDR", defaults.listen_addr) or defaults.listen_addr,
            shutdown_grace_seconds=reader.number(
                "SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_seconds, lo=0, hi=3600
            ),
            max_concurrent_rpcs=reader.integer(
                "MAX_CONCURRENT_RPCS", defaults.max_concurrent_rpcs, lo=1, hi=1_000_000
            ),
            workers=reader.integer("WORKERS", defaults.workers, lo=1, hi=256),
            metrics_addr=reader.text("METRICS_ADDR", None),
            deadline_margin_ms=reader.integer(
                "DEADLINE_MARGIN_MS", defaults.deadline_margin_ms, lo=0, hi=60_000
            ),
            tls_cert_file=reader.path("TLS_CERT_FILE"),
            tls_key_file=reader.path("TLS_KEY_FILE"),
            tls_client_ca_file=reader.path("TLS_CLIENT_CA_FILE"),
            mtls_listen_addr=reader.text("MTLS_LISTEN_ADDR", None),
            service_identities=reader.service_identities("SERVICE_IDENTITIES"),
            allow_signup=reader.boolean("ALLOW_SIGNUP", defaults.allow_signup),
            bcrypt_rounds=reader.integer("BCRYPT_ROUNDS", defaults.bcrypt_rounds, lo=4, hi=31),
            bcrypt_max_threads=reader.integer(
                "BCRYPT_MAX_THREADS", defaults.bcrypt_max_threads, lo=1, hi=256
            ),
            bcrypt_nice=reader.integer("BCRYPT_NICE", defaults.bcrypt_nice, lo=0, hi=19),
            access_token_ttl_seconds=reader.integer(
                "ACCESS_TOKEN_TTL_SECONDS", defaults.access_token_ttl_seconds, lo=30, hi=86_400
            ),
            refresh_token_ttl_seconds=reader.integer(
                "REFRESH_TOKEN_TTL_SECONDS",
                defaults.refresh_token_ttl_seconds,
                lo=60,
                hi=31_622_400,
            ),
            session_cleanup_interval_seconds=reader.number(
                "SESSION_CLEANUP_INTERVAL_SECONDS",
                defaults.session_cleanup_interval_seconds,
                lo=0,
                hi=86_400,
            ),
            jwt_issuer=reader.text("JWT_ISSUER", defaults.jwt_issuer) or defaults.jwt_issuer,
            jwt_audience=reader.text("JWT_AUDIENCE", defaults.jwt_audience)
            or defaults.jwt_audience,
            jwt_private_key_pem=reader.text("JWT_PRIVATE_KEY", None),
            jwt_private_key_file=reader.path("JWT_PRIVATE_KEY_FILE"),
            jwt_algorithm=reader.choice("JWT_ALGORITHM", defaults.jwt_algorithm, JWT_ALGORITHMS),
            jwt_hs256_secret=reader.secret("JWT_HS256_SECRET"),
            jwt_verification_key_files=reader.paths("JWT_VERIFICATION_KEY_FILES"),
            login_max_failures=reader.integer(
                "LOGIN_MAX_FAILURES", defaults.login_max_failures, lo=1, hi=1000
            ),
            login_lockout_seconds=reader.integer(
                "LOGIN_LOCKOUT_SECONDS", defaults.login_lockout_seconds, lo=1, hi=86_400
            ),
            login_lockout_max_seconds=reader.integer(
                "LOGIN_LOCKOUT_MAX_SECONDS", defaults.login_lockout_max_seconds, lo=1, hi=2_592_000
            ),
            rate_limit_rps=reader.number(
                "RATE_LIMIT_RPS", defaults.rate_limit_rps, lo=0, hi=1_000_000
            ),
            rate_limit_burst=reader.integer(
                "RATE_LIMIT_BURST", defaults.rate_limit_burst, lo=1, hi=1_000_000
            ),
            auth_rate_limit_rps=reader.number(
                "AUTH_RATE_LIMIT_RPS", defaults.auth_rate_limit_rps, lo=0, hi=1_000_000
            ),
            auth_rate_limit_burst=reader.integer(
                "AUTH_RATE_LIMIT_BURST", defaults.auth_rate_limit_burst, lo=1, hi=1_000_000
            ),
            trusted_proxies=reader.networks("TRUSTED_PROXIES"),
            redis_url=reader.text("REDIS_URL", None),
            redis_timeout_seconds=reader.number(
                "REDIS_TIMEOUT_SECONDS", defaults.redis_timeout_seconds, lo=0.001, hi=60
            ),
            environment=reader.choice(
                "ENV", defaults.environment, ("development", "production")
            ),
            data_dir=reader.path("DATA_DIR") or defaults.data_dir,
            log_format=reader.choice("LOG_FORMAT", defaults.log_format, ("json", "text")),
            log_level=reader.choice(
                "LOG_LEVEL", defaults.log_level, ("DEBUG", "INFO", "WARNING", "ERROR")
            ),
        )
        problems = reader.problems + settings._cross_checks()
        if problems:
            raise SettingsError(problems)
        return settings

    def _cross_checks(self) -> list[str]:
        problems = []
        for name, url in (
            ("DATABASE_URL", self.database_url),
            ("MIGRATION_DATABASE_URL", self.migration_database_url),
            ("REVOCATION_DATABASE_URL", self.revocation_database_url),
        ):
            if url is not None and not url.startswith("postgresql+asyncpg://"):
                problems.append(
                    f"{PREFIX}{name} must start with postgresql+asyncpg:// "
                    "(SQLAlchemy URL for the asyncpg driver)"
                )
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
        if self.redis_url is not None and not self.redis_url.startswith(REDIS_SCHEMES):
            problems.append(f"{PREFIX}REDIS_URL must start with one of {', '.join(REDIS_SCHEMES)}")
        if _host_port(self.listen_addr) is None:
            problems.append(f"{PREFIX}LISTEN_ADDR must be host:port, got {self.listen_addr!r}")
        problems += self.worker_checks(self.workers)
        if self.metrics_addr is not None and _host_port(self.metrics_addr) is None:
            problems.append(f"{PREFIX}METRICS_ADDR must be host:port, got {self.metrics_addr!r}")
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
            parsed = None if addr is None else _host_port(addr)
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
            if _host_port(self.mtls_listen_addr) is None:
                problems.append(
                    f"{PREFIX}MTLS_LISTEN_ADDR must be host:port, got {self.mtls_listen_addr!r}"
                )
            elif self.mtls_listen_addr == self.listen_addr and not self.listen_addr.endswith(":0"):
                problems.append(f"{PREFIX}MTLS_LISTEN_ADDR must differ from {PREFIX}LISTEN_ADDR")
        if self.service_identities and self.tls_client_ca_file is None:
            problems.append(
                f"{PREFIX}SERVICE_IDENTITIES requires {PREFIX}TLS_CLIENT_CA_FILE "
                "(identities come from verified client certificates)"
            )
        return problems


def normalize_identity(identity: str) -> str:
    """The form service identities are compared in: DNS names are
    case-insensitive, so they are lower-cased; URIs are kept as they are.
    Raises nothing."""
    return identity if "://" in identity else identity.lower()


def _host_port(addr: str) -> tuple[str, int] | None:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


class _Reader:
    """Reads USERSVC_* variables, remembering every problem."""

    _TRUE = frozenset({"1", "true", "yes", "on"})
    _FALSE = frozenset({"0", "false", "no", "off"})

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.problems: list[str] = []

    def _raw(self, name: str) -> str | None:
        value = self.env.get(PREFIX + name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str | None) -> str | None:
        raw = self._raw(name)
        return default if raw is None else raw

    def path(self, name: str) -> Path | None:
        raw = self._raw(name)
        return None if raw is None else Path(raw)

    def paths(self, name: str) -> tuple[Path, ...]:
        """A comma-separated list of paths."""
        raw = self._raw(name)
        if raw is None:
            return ()
        return tuple(Path(part.strip()) for part in raw.split(",") if part.strip())

    def secret(self, name: str) -> str | None:
        # Unlike other values, a secret is taken verbatim: stripping would
        # silently shorten it.
        value = self.env.get(PREFIX + name)
        return value or None

    def service_identities(self, name: str) -> dict[str, frozenset[str]]:
        """``identity=role+role;identity=role``, e.g.
        ``spiffe://corp/billing=service;orders.internal=service+admin``."""
        raw = self._raw(name)
        if raw is None:
            return {}
        identities: dict[str, frozenset[str]] = {}
        for entry in filter(None, (part.strip() for part in raw.split(";"))):
            # The last "=" splits: roles never contain one, a URI might.
            identity, sep, roles_text = entry.rpartition("=")
            identity = normalize_identity(identity.strip())
            roles = frozenset(filter(None, (r.strip() for r in roles_text.split("+"))))
            if not sep or not identity or not roles:
                self.problems.append(f"{PREFIX}{name}: expected identity=role+role, got {entry!r}")
                continue
            unknown = sorted(roles - KNOWN_ROLES)
            if unknown:
                self.problems.append(
                    f"{PREFIX}{name}: unknown role(s) {', '.join(unknown)} for {identity!r} "
                    f"(known: {', '.join(sorted(KNOWN_ROLES))})"
                )
            if identity in identities:
                self.problems.append(f"{PREFIX}{name}: {identity!r} is listed twice")
            identities[identity] = roles
        return identities

    def networks(self, name: str) -> tuple[IPNetwork, ...]:
        """A comma-separated list of IP addresses and CIDR networks."""
        raw = self._raw(name)
        if raw is None:
            return ()
        networks: list[IPNetwork] = []
        for part in (p.strip() for p in raw.split(",")):
            if not part:
                continue
            try:
                networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError:
                self.problems.append(
                    f"{PREFIX}{name}: {part!r} is not an IP address or CIDR network"
                )
        return tuple(networks)

    def integer(self, name: str, default: int, *, lo: int, hi: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{PREFIX}{name} must be an integer, got {raw!r}")
            return default
        if not lo <= value <= hi:
            self.problems.append(f"{PREFIX}{name} must be between {lo} and {hi}, got {value}")
        return value

    def number(self, name: str, default: float, *, lo: float, hi: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{PREFIX}{name} must be a number, got {raw!r}")
            return default
        if not lo <= value <= hi:
            self.problems.append(f"{PREFIX}{name} must be between {lo} and {hi}, got {value}")
        return value

    def boolean(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.lower() in self._TRUE:
            return True
        if raw.lower() in self._FALSE:
            return False
        self.problems.append(f"{PREFIX}{name} must be true or false, got {raw!r}")
        return default

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        for option in allowed:
            if raw.lower() == option.lower():
                return option
        self.problems.append(f"{PREFIX}{name} must be one of {', '.join(allowed)}, got {raw!r}")
        return default


def split_host_port(addr: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port`` too) as (host without brackets, port);
    None when it is not one. Raises nothing."""
    return _host_port(addr)
