"""The composition root: the one place that builds every object of a server
process from Settings: engine, unit of work factory, services, the signing
key ring, servicers, the public-method selector, the interceptor chain, the
TLS credentials, and (for ``serve``) the database to serve from, metrics and
tracing. usersvc/server.py only binds and serves what this builds;
usersvc/cli.py only parses arguments and calls these. Tests call
``bootstrap`` with their own settings."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database import create_engine
from usersvc.adapters.db_monitor import DatabaseMonitor
from usersvc.adapters.keys import LoggerLike, read_key_material
from usersvc.adapters.ratelimit import InProcessRateLimiter, RedisRateLimiter
from usersvc.adapters.read_lane import SqlAlchemyUserReader
from usersvc.adapters.revocations import CachedRevocationChecker, PostgresRevocationListener
from usersvc.adapters.tls import ServerCredentials, load_server_credentials
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.adapters.write_lane import SqlAlchemyUserWriter
from usersvc.api.auth_servicer import AuthServicer
from usersvc.api.context import current_call
from usersvc.api.event_servicer import EventServicer
from usersvc.api.interceptors import AdmissionInterceptor, build_interceptors
from usersvc.api.public import PublicMethods
from usersvc.api.user_servicer import UserServicer
from usersvc.bootstrap_events import EventParts, build_event_parts
from usersvc.config import Settings
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.passwords import PasswordPolicy
from usersvc.domain.rate_limits import rate_or_none
from usersvc.domain.revocations import RevocationCache
from usersvc.services.account_codes import AccountCodeService, code_key
from usersvc.services.auth import AuthService
from usersvc.services.batch_writes import BatchWriteService
from usersvc.services.maintenance import SessionMaintenance
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.sessions import SessionLifetimes, SessionRevoker
from usersvc.services.tokens import KeyRing, TokenService, key_ring_of
from usersvc.services.users import UserService

if TYPE_CHECKING:
    # Imported only with USERSVC_METRICS_ADDR: no prometheus_client otherwise;
    # only with OTEL_* asking for traces: no OpenTelemetry otherwise.
    from usersvc.api.interceptors.wrapping import WrappingInterceptor
    from usersvc.observability.metrics import Metrics, MetricsEndpoint
    from usersvc.observability.tracing import Tracing

logger = logging.getLogger("usersvc.bootstrap")


@dataclass(frozen=True)
class Serving:
    """What the gRPC server (usersvc/server.py) binds and runs."""

    credentials: ServerCredentials
    public_methods: PublicMethods
    # One Pipeline running the interceptors in the order
    # usersvc/api/interceptors/__init__.py writes down.
    interceptors: list[grpc.aio.ServerInterceptor]  # type: ignore[type-arg]
    user_servicer: UserServicer
    auth_servicer: AuthServicer
    event_servicer: EventServicer


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
    # None when built with serving=False (a command that serves nothing).
    serving: Serving | None = None
    # Events: numbering, EventService, retention, the NATS relay.
    events: EventParts | None = None

    async def start_background(self) -> None:
        """Start the revocation feed (waiting briefly for its first load)
        and the session clean-up timer. Raises RuntimeError when started
        twice."""
        if self.database_monitor is not None:
            # First, so the server's health starts from the truth.
            await self.database_monitor.start()
        await self.revocation_listener.start()
        self.session_maintenance.start()
        if self.events is not None:
            await self.events.start()
        if self.metrics is not None:
            self.metrics.start()

    async def aclose(self) -> None:
        """Stop the background tasks, release the connection pool and the
        bcrypt threads."""
        if self.metrics is not None:
            await self.metrics.stop()
        await self.session_maintenance.stop()
        if self.events is not None:
            await self.events.stop()
        await self.revocation_listener.stop()
        if self.database_monitor is not None:
            await self.database_monitor.stop()
        await self.engine.dispose()
        await self.rate_limiter.aclose()
        self.hasher.close()
        if self.tracing is not None:
            self.tracing.shutdown()


def load_key_ring(settings: Settings, logger: LoggerLike) -> KeyRing:
    """The token key ring the settings name (see usersvc/adapters/keys.py).
    Raises KeyConfigError for an unreadable, encrypted, short or missing
    key."""
    material = read_key_material(settings, logger)
    return key_ring_of(
        material.signing, material.verification, retired_secrets=material.retired_secrets
    )


def resolve_database_url(settings: Settings) -> tuple[str, bool]:
    """The database URL to use and whether it is the embedded server.

    Starts the embedded PostgreSQL when no URL is configured (development).
    """
    if settings.database_url is not None:
        return settings.database_url, False
    from usersvc.adapters.embedded import start_embedded_postgres

    return start_embedded_postgres(settings.data_dir), True


def prepare_serving_database(settings: Settings) -> str:
    """The URL ``serve`` runs on: USERSVC_DATABASE_URL as it is (its schema
    is the deployment's job: ``usersvc migrate``), or in development the
    embedded PostgreSQL, started and migrated to the newest revision (we own
    it, so keeping its schema current is our job). Raises what starting or
    migrating raises (RuntimeError, OSError, SQLAlchemy errors)."""
    if settings.database_url is not None:
        return settings.database_url
    from usersvc.adapters.embedded import prepare_embedded_postgres

    return prepare_embedded_postgres(settings.data_dir)


@dataclass
class Observability:
    """The metrics and tracing of one serving process, and the metrics
    endpoint it opened (None: the supervisor serves the workers' metrics,
    or metrics are off)."""

    metrics: Metrics | None = None
    tracing: Tracing | None = None
    endpoint: MetricsEndpoint | None = None

    def close(self) -> None:
        """Release the metrics port. Raises nothing."""
        if self.endpoint is not None:
            self.endpoint.close()
            self.endpoint = None


def build_observability(
    settings: Settings, *, worker: bool = False, environ: Mapping[str, str] = os.environ
) -> Observability:
    """Metrics when USERSVC_METRICS_ADDR is set (a single process serves
    them itself; a worker writes them for its supervisor to serve) and
    tracing when the OTEL_* variables in ``environ`` ask for it (each worker
    exports its own spans). Raises OSError when the metrics address cannot
    be bound."""
    from usersvc.observability.tracing import configure_tracing

    observed = Observability()
    if settings.metrics_addr is not None:
        from usersvc.observability.metrics import (
            MULTIPROC_DIR_VARIABLE,
            Metrics,
            serve_process_metrics,
        )

        if not worker:
            observed.metrics = Metrics.create()
            observed.endpoint = serve_process_metrics(settings.metrics_addr, observed.metrics)
        elif MULTIPROC_DIR_VARIABLE in environ:
            observed.metrics = Metrics.create()
    try:
        observed.tracing = configure_tracing(environ)
    except BaseException:
        observed.close()
        raise
    return observed


def _interceptors(
    settings: Settings,
    *,
    auth_service: AuthService,
    public_methods: PublicMethods,
    monitor: DatabaseMonitor | None,
    rate_limiter: InProcessRateLimiter | RedisRateLimiter,
    metrics: Metrics | None,
    tracing: Tracing | None,
) -> list[grpc.aio.ServerInterceptor]:  # type: ignore[type-arg]
    tracing_interceptor: WrappingInterceptor | None = None
    if tracing is not None:
        # Imports OpenTelemetry: only when tracing is on.
        from usersvc.api.interceptors.tracing import TracingInterceptor

        tracing_interceptor = TracingInterceptor(tracing.tracer)
    return build_interceptors(
        auth_service=auth_service,
        public_methods=public_methods,
        service_identities=settings.service_identities,
        deadline_margin_seconds=settings.deadline_margin_ms / 1000,
        ensure_database=None if monitor is None else monitor.ensure_available,
        rate_limiter=rate_limiter,
        general_rate=rate_or_none(settings.rate_limit_rps, settings.rate_limit_burst),
        auth_rate=rate_or_none(settings.auth_rate_limit_rps, settings.auth_rate_limit_burst),
        trusted_proxies=settings.trusted_proxies,
        call_metrics=None if metrics is None else metrics.calls,
        on_rate_limited=None if metrics is None else metrics.rate_limited,
        tracing=tracing_interceptor,
        admission=AdmissionInterceptor(
            max_calls=settings.max_concurrent_rpcs,
            max_streams=settings.max_open_streams,
            max_reflection_streams=settings.max_reflection_streams,
            message_timeout_seconds=settings.request_message_timeout_seconds,
            on_refused=None if metrics is None else metrics.call_refused,
        ),
    )


def bootstrap(
    settings: Settings,
    *,
    database_url: str,
    lockout_clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
    tracing: Tracing | None = None,
    serving: bool = True,
) -> Container:
    """Wire the service; ``lockout_clock`` (like time.time) tells when
    account locks end, for tests that move it; ``metrics`` (None: off) is
    fed by the services and reads the pool; ``tracing`` (from
    usersvc.observability.tracing.configure_tracing; None: off) adds spans
    to every RPC and SQL statement; ``serving=False`` leaves out what only
    a server needs (TLS files, interceptors, servicers), for a command such
    as create-admin. Raises TlsConfigError (a RuntimeError) for unusable TLS
    files, KeyConfigError (a ValueError) for unusable signing keys,
    ValueError for a malformed USERSVC_REDIS_URL."""
    # Files first: a bad one stops the start before any pool or thread exists.
    credentials = load_server_credentials(settings) if serving else None
    key_ring = load_key_ring(settings, logger)
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
    uow_factory = make_uow_factory(engine, monitor, call_context=current_call)
    hasher = BcryptPasswordHasher(
        rounds=settings.bcrypt_rounds,
        max_threads=settings.bcrypt_max_threads,
        nice=settings.bcrypt_nice,
    )
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
    lockout = LockoutPolicy(
        max_failures=settings.login_max_failures,
        lockout_seconds=settings.login_lockout_seconds,
        max_lockout_seconds=settings.login_lockout_max_seconds,
    )
    # GetUser, LookupUser, BatchGetUsers and the role check of admin and
    # service tokens: one autocommit statement.
    reader = SqlAlchemyUserReader(
        engine,
        monitor,
        transaction_pooling=settings.db_transaction_pooling,
        statement_span=None if tracing is None else tracing.statement_span(engine),
    )
    # UpdateUser of display_name and labels: one autocommit statement.
    writer = SqlAlchemyUserWriter(
        engine,
        monitor,
        call_context=current_call,
        transaction_pooling=settings.db_transaction_pooling,
        statement_span=None if tracing is None else tracing.statement_span(engine),
    )
    user_service = UserService(
        uow_factory=uow_factory,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        allow_signup=settings.allow_signup,
        sessions=revoker,
        reader=reader,
        writer=writer,
        lockout=lockout,
        clock=lockout_clock,
        # Read at each call: a SIGHUP key reload rotates page tokens too.
        page_token_keys=lambda: tokens.key_ring.page_token_keys,
    )
    auth_service = AuthService(
        uow_factory=uow_factory,
        hasher=hasher,
        tokens=tokens,
        revocations=revocations,
        sessions=revoker,
        lockout=lockout,
        clock=lockout_clock,
        on_login=None if metrics is None else metrics.login_outcome,
        reader=reader,
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
    events = build_event_parts(settings, engine, database_url, metrics)
    served = None
    if credentials is not None:
        public_methods = PublicMethods(allow_signup=settings.allow_signup)
        served = Serving(
            credentials=credentials,
            public_methods=public_methods,
            interceptors=_interceptors(
                settings,
                auth_service=auth_service,
                public_methods=public_methods,
                monitor=monitor,
                rate_limiter=rate_limiter,
                metrics=metrics,
                tracing=tracing,
            ),
            user_servicer=UserServicer(
                user_service, account_codes=account_codes, batch_writes=batch_writes
            ),
            auth_servicer=AuthServicer(auth_service),
            event_servicer=EventServicer(events.service),
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
        serving=served,
        events=events,
    )
