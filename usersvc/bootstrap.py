"""The composition root: the one place that builds engines, repositories,
services and servicers from Settings. Tests call it with their own settings."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database import create_engine
from usersvc.adapters.db_monitor import DatabaseMonitor
from usersvc.adapters.ratelimit import InProcessRateLimiter, RedisRateLimiter
from usersvc.adapters.read_lane import SqlAlchemyUserReader
from usersvc.adapters.revocations import CachedRevocationChecker, PostgresRevocationListener
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.config import Settings
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.passwords import PasswordPolicy
from usersvc.services.account_codes import AccountCodeService, code_key
from usersvc.services.auth import AuthService
from usersvc.services.batch_writes import BatchWriteService
from usersvc.services.maintenance import SessionMaintenance
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.revocations import RevocationCache
from usersvc.services.sessions import SessionLifetimes, SessionRevoker
from usersvc.services.tokens import TokenService, load_key_ring
from usersvc.services.users import UserService

if TYPE_CHECKING:
    # Imported only with USERSVC_METRICS_ADDR: no prometheus_client otherwise.
    from usersvc.observability.metrics import Metrics
    from usersvc.observability.tracing import Tracing

logger = logging.getLogger("usersvc.bootstrap")


@dataclass
class Container:
    """Everything one server process runs on; closed in reverse order."""

    settings: Settings
    database_url: str
    engine: AsyncEngine
    hasher: BcryptPasswordHasher
    tokens: TokenService
    user_service: UserService
    auth_service: AuthService
    account_codes: AccountCodeService
    batch_writes: BatchWriteService
    revocation_cache: RevocationCache
    revocations: CachedRevocationChecker
    revocation_listener: PostgresRevocationListener
    session_maintenance: SessionMaintenance
    # None when USERSVC_DB_PROBE_INTERVAL_SECONDS is 0.
    database_monitor: DatabaseMonitor | None = None
    # In process, or shared through Redis with USERSVC_REDIS_URL.
    rate_limiter: InProcessRateLimiter | RedisRateLimiter = field(
        default_factory=InProcessRateLimiter
    )
    # None unless USERSVC_METRICS_ADDR is set.
    metrics: Metrics | None = None
    # None unless OTEL_* variables ask for traces and the otel extra is there.
    tracing: Tracing | None = None

    async def start_background(self) -> None:
        """Start the revocation feed (waiting briefly for its first load)
        and the session clean-up timer. Raises RuntimeError when started
        twice."""
        if self.database_monitor is not None:
            # First, so the server's health starts from the truth.
            await self.database_monitor.start()
        await self.revocation_listener.start()
        self.session_maintenance.start()
        if self.metrics is not None:
            self.metrics.start()

    async def aclose(self) -> None:
        """Stop the background tasks, release the connection pool and the
        bcrypt threads."""
        if self.metrics is not None:
            await self.metrics.stop()
        await self.session_maintenance.stop()
        await self.revocation_listener.stop()
        if self.database_monitor is not None:
            await self.database_monitor.stop()
        await self.engine.dispose()
        await self.rate_limiter.aclose()
        self.hasher.close()
        if self.tracing is not None:
            self.tracing.shutdown()


def resolve_database_url(settings: Settings) -> tuple[str, bool]:
    """The database URL to use and whether it is the embedded server.

    Starts the embedded PostgreSQL when no URL is configured (development).
    """
    if settings.database_url is not None:
        return settings.database_url, False
    from usersvc.adapters.embedded import start_embedded_postgres

    return start_embedded_postgres(settings.data_dir), True


def bootstrap(
    settings: Settings,
    *,
    database_url: str,
    lockout_clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
) -> Container:
    """Wire the service; ``lockout_clock`` (like time.time) tells when
    account locks end, for tests that move it; ``metrics`` (None: off) is
    fed by the services and reads the pool; ``tracing`` (from
    usersvc.observability.tracing.configure_tracing; None: off) adds spans
    to every RPC and SQL statement. Raises ValueError for unusable signing
    keys or a malformed USERSVC_REDIS_URL."""
    engine = create_engine(settings, database_url)
    if metrics is not None:
        metrics.watch_pool(engine.pool)  # type: ignore[arg-type]
    if tracing is not None:
        tracing.instrument_engine(engine)
    monitor = (
        DatabaseMonitor.for_database(settings, database_url)
        if settings.db_probe_interval_seconds > 0
        else None
    )
    uow_factory = make_uow_factory(engine, monitor)
    hasher = BcryptPasswordHasher(
        rounds=settings.bcrypt_rounds,
        max_threads=settings.bcrypt_max_threads,
        nice=settings.bcrypt_nice,
    )
    key_ring = load_key_ring(settings, logger)
    tokens = TokenService(
        key_ring,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        access_ttl_seconds=settings.access_token_ttl_seconds,
    )
    lifetimes = SessionLifetimes(
        access_ttl_seconds=settings.access_token_ttl_seconds,
        refresh_ttl_seconds=settings.refresh_token_ttl_seconds,
    )
    revocation_cache = RevocationCache()
    revocations = CachedRevocationChecker(
        revocation_cache,
        engine,
        ensure_available=None if monitor is None else monitor.ensure_available,
    )
    # Revocations made here reach this process's cache at commit, without
    # waiting for the NOTIFY to come back through the listener.
    revoker = SessionRevoker(
        lifetimes=lifetimes,
        on_revoked=revocation_cache.add,
        on_counted=None if metrics is None else metrics.sessions_revoked,
    )
    user_service = UserService(
        uow_factory=uow_factory,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        allow_signup=settings.allow_signup,
        sessions=revoker,
        # GetUser, LookupUser and BatchGetUsers: one autocommit statement.
        reader=SqlAlchemyUserReader(
            engine,
            monitor,
            transaction_pooling=settings.db_transaction_pooling,
            statement_span=None if tracing is None else tracing.statement_span(engine),
        ),
    )
    auth_service = AuthService(
        uow_factory=uow_factory,
        hasher=hasher,
        tokens=tokens,
        revocations=revocations,
        sessions=revoker,
        lockout=LockoutPolicy(
            max_failures=settings.login_max_failures,
            lockout_seconds=settings.login_lockout_seconds,
            max_lockout_seconds=settings.login_lockout_max_seconds,
        ),
        clock=lockout_clock,
        on_login=None if metrics is None else metrics.login_outcome,
    )
    account_codes = AccountCodeService(
        uow_factory=uow_factory,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        sessions=revoker,
        key=code_key(key_ring),
        ttl_seconds=settings.code_ttl_seconds,
    )
    batch_writes = BatchWriteService(uow_factory=uow_factory, sessions=revoker)
    rate_limiter: InProcessRateLimiter | RedisRateLimiter = InProcessRateLimiter()
    if settings.redis_url is not None:
        rate_limiter = RedisRateLimiter.from_url(
            settings.redis_url, timeout_seconds=settings.redis_timeout_seconds
        )
    return Container(
        settings=settings,
        database_url=database_url,
        engine=engine,
        hasher=hasher,
        tokens=tokens,
        user_service=user_service,
        auth_service=auth_service,
        account_codes=account_codes,
        batch_writes=batch_writes,
        revocation_cache=revocation_cache,
        revocations=revocations,
        # LISTEN needs a session of its own: behind a transaction pool this
        # is a direct URL (Settings insists on one then).
        revocation_listener=PostgresRevocationListener.for_database(
            revocation_cache, settings, settings.revocation_database_url or database_url
        ),
        session_maintenance=SessionMaintenance(
            uow_factory=uow_factory,
            lifetimes=lifetimes,
            interval_seconds=settings.session_cleanup_interval_seconds,
        ),
        database_monitor=monitor,
        rate_limiter=rate_limiter,
        metrics=metrics,
        tracing=tracing,
    )
