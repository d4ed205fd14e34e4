"""Settings: read once from the environment, validated, passed in.

Nothing here runs at import. ``Settings.from_env()`` collects every problem and
raises one ``SettingsError`` listing them all, so a bad deployment fails at
start with a clear message instead of at the first call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "USERSVC_"


class SettingsError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class Settings:
    # Database. None means: start the embedded PostgreSQL under data_dir.
    database_url: str | None = field(default=None, repr=False)
    # Owner role for `usersvc migrate`; defaults to database_url.
    migration_database_url: str | None = field(default=None, repr=False)
    db_pool_size: int = 10
    db_max_overflow: int = 10
    db_pool_timeout_seconds: float = 5.0
    db_pool_pre_ping: bool = True
    db_pool_recycle_seconds: int = 1800
    # Server-side statement_timeout for every connection of the service.
    db_statement_timeout_ms: int = 5000

    # Server.
    listen_addr: str = "127.0.0.1:50051"
    shutdown_grace_seconds: float = 10.0
    max_message_bytes: int = 1024 * 1024

    # Users and passwords.
    allow_signup: bool = True
    bcrypt_rounds: int = 12
    bcrypt_max_threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))

    # Tokens.
    access_token_ttl_seconds: int = 900
    jwt_issuer: str = "usersvc"
    jwt_audience: str = "usersvc"
    # Ed25519 private key in PEM: inline, or a file. Neither: development
    # generates one under data_dir (production refuses to start).
    jwt_private_key_pem: str | None = field(default=None, repr=False)
    jwt_private_key_file: Path | None = None

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
            listen_addr=reader.text("LISTEN_ADDR", defaults.listen_addr) or defaults.listen_addr,
            shutdown_grace_seconds=reader.number(
                "SHUTDOWN_GRACE_SECONDS", defaults.shutdown_grace_seconds, lo=0, hi=3600
            ),
            allow_signup=reader.boolean("ALLOW_SIGNUP", defaults.allow_signup),
            bcrypt_rounds=reader.integer("BCRYPT_ROUNDS", defaults.bcrypt_rounds, lo=4, hi=31),
            bcrypt_max_threads=reader.integer(
                "BCRYPT_MAX_THREADS", defaults.bcrypt_max_threads, lo=1, hi=256
            ),
            access_token_ttl_seconds=reader.integer(
                "ACCESS_TOKEN_TTL_SECONDS", defaults.access_token_ttl_seconds, lo=30, hi=86_400
            ),
            jwt_issuer=reader.text("JWT_ISSUER", defaults.jwt_issuer) or defaults.jwt_issuer,
            jwt_audience=reader.text("JWT_AUDIENCE", defaults.jwt_audience)
            or defaults.jwt_audience,
            jwt_private_key_pem=reader.text("JWT_PRIVATE_KEY", None),
            jwt_private_key_file=reader.path("JWT_PRIVATE_KEY_FILE"),
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
        ):
            if url is not None and not url.startswith("postgresql+asyncpg://"):
                problems.append(
                    f"{PREFIX}{name} must start with postgresql+asyncpg:// "
                    "(SQLAlchemy URL for the asyncpg driver)"
                )
        if _host_port(self.listen_addr) is None:
            problems.append(f"{PREFIX}LISTEN_ADDR must be host:port, got {self.listen_addr!r}")
        if self.jwt_private_key_pem and self.jwt_private_key_file:
            problems.append(
                f"set only one of {PREFIX}JWT_PRIVATE_KEY and {PREFIX}JWT_PRIVATE_KEY_FILE"
            )
        if self.is_production:
            if not (self.jwt_private_key_pem or self.jwt_private_key_file):
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
