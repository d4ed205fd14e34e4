"""Revoked sessions, kept in memory on every replica and fed by PostgreSQL.

Each replica holds one dedicated asyncpg connection (outside the engine's
pool: a pooled connection is reset and shared, and LISTEN only works on a
connection that stays ours) that LISTENs on REVOCATION_CHANNEL. On every
(re)connect it LISTENs first and then reloads every unexpired row of
``session_revocations``: a revocation committed before the reload's snapshot
is in the rows, one committed after it arrives as a notification, so a
notification missed while disconnected is never a hole.

The guarantee "a revoked session is refused within one second" must not lapse
silently when that connection dies, so:

- the cache is marked unhealthy the moment the connection is known to be
  lost (asyncpg's termination callback, a failed query), and healthy again
  only once the reload after a reconnect has finished;
- a connection that dies without telling us (a half-open TCP connection) is
  caught by a heartbeat: every ``heartbeat_interval`` a trivial query must
  answer within ``heartbeat_timeout``; with the defaults a dead feed is
  noticed within about 0.75 s;
- while unhealthy, CachedRevocationChecker asks the database for each
  session it is asked about, so answers stay right, only slower.

The connection goes to USERSVC_REVOCATION_DATABASE_URL (default: the
service's URL). Behind PgBouncer in transaction mode LISTEN does not work
(the proxy hands the listening server connection to other clients between
transactions): that URL must then name PostgreSQL itself or a session-mode
pool, and Settings refuses USERSVC_DB_TRANSACTION_POOLING without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlencode

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.database import (
    APPLICATION_NAME,
    COMMAND_TIMEOUT_MARGIN_SECONDS,
    CONNECT_TIMEOUT_SECONDS,
    LIBPQ_TLS_PARAMETERS,
)
from usersvc.adapters.database_errors import translate_database_errors
from usersvc.adapters.revocation_channel import REVOCATION_CHANNEL, parse_payload
from usersvc.config import Settings
from usersvc.domain.revocations import REVOCATION_MARGIN, RevocationCache

logger = logging.getLogger(__name__)

# Distinguishes the listener's connection from the pool's in pg_stat_activity.
LISTENER_APPLICATION_NAME = f"{APPLICATION_NAME}-revocations"

# Expired entries dropped per heartbeat at most: about 10 ms of event loop.
PRUNE_SLICE = 5_000

_RELOAD_SQL = "SELECT session_id, expire_time FROM session_revocations WHERE expire_time > now()"
_CHECK_SQL = text(
    "SELECT expire_time FROM session_revocations "
    "WHERE session_id = :session_id AND expire_time > now()"
)
# Options the SQLAlchemy dialect consumes itself and asyncpg.connect rejects.
_DIALECT_ONLY_OPTIONS = ("prepared_statement_cache_size", "prepared_statement_name_func")
_NUMERIC_OPTIONS = ("timeout", "command_timeout")

Connector = Callable[[], Awaitable[Any]]  # -> asyncpg.Connection


def equal_jitter_backoff(failures: int, initial: float, maximum: float) -> float:
    """The pause after the ``failures``-th failure in a row (1 for the first):
    a ceiling of ``initial`` doubled per further failure, capped at
    ``maximum``, of which a random upper half is taken."""
    doublings = min(failures - 1, 32)  # 2**32 is past any sane cap already
    ceiling = min(maximum, initial * 2.0**doublings)
    # Equal jitter: replicas that lost the database together do not
    # reconnect in lockstep, and none retries at once in a tight loop.
    return ceiling / 2 + random.uniform(0, ceiling / 2)  # noqa: S311 - not security


async def retry_forever(
    attempt: Callable[[], Awaitable[None]],
    *,
    pause: Callable[[int], float],
    log: logging.Logger,
    what: str,
) -> None:
    """Runs ``attempt`` again and again until cancelled: after it returns, or
    raises, it sleeps ``pause(failures)`` seconds, ``failures`` being the
    failed attempts in a row (0 after a success). Logs a warning ("<what>;
    retrying: ...") on the first failure of a streak only."""
    failures = 0
    while True:
        try:
            await attempt()
            failures = 0
        except Exception as exc:
            failures += 1
            if failures == 1:
                log.warning("%s; retrying: %s: %s", what, type(exc).__name__, exc)
        await asyncio.sleep(pause(failures))


class _ConnectionLost(Exception):
    """The listener's connection was closed under it."""


def asyncpg_connect_arguments(
    url: str, settings: Settings, *, application_name: str = LISTENER_APPLICATION_NAME
) -> dict[str, Any]:
    """Keyword arguments for ``asyncpg.connect`` that reach the same server,
    as the same role, with the same TLS settings as the engine
    ``usersvc.adapters.database.create_engine(settings, url)`` builds:
    user, password, host (also ``?host=/socket/dir``), port and database
    as the SQLAlchemy asyncpg dialect reads them, asyncpg's ``ssl`` and the
    libpq ``sslmode``/``sslrootcert``/... options, the statement timeouts
    and the connect timeout.

    Raises sqlalchemy.exc.ArgumentError for a malformed URL or one that does
    not name the asyncpg dialect.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or parsed.get_driver_name() != "asyncpg":
        from sqlalchemy.exc import ArgumentError

        raise ArgumentError("the revocation listener needs a postgresql+asyncpg:// URL")
    tls = {name: parsed.query[name] for name in LIBPQ_TLS_PARAMETERS if name in parsed.query}
    parsed = parsed.difference_update_query(tls)
    # The dialect's own translation: the same host/port/user handling, for
    # multi-host and Unix-socket URLs too, as the engine's connections get.
    _, translated = parsed.get_dialect()().create_connect_args(parsed)
    options: dict[str, Any] = dict(translated)
    for name in _DIALECT_ONLY_OPTIONS:
        options.pop(name, None)
    for name in _NUMERIC_OPTIONS:
        if isinstance(options.get(name), str):
            options[name] = float(options[name])
    if tls:
        # asyncpg reads the libpq TLS options only from a DSN; the keyword
        # arguments still decide host, port, user and database.
        options["dsn"] = "postgresql://?" + urlencode(tls, doseq=True)
    server_settings = {"application_name": application_name}
    if settings.db_statement_timeout_ms > 0:
        # Like the engine's connections: with db_transaction_pooling nothing
        # session-wide is sent (PgBouncer refuses the startup parameter).
        if not settings.db_transaction_pooling:
            server_settings["statement_timeout"] = str(settings.db_statement_timeout_ms)
        options.setdefault(
            "command_timeout",
            settings.db_statement_timeout_ms / 1000 + COMMAND_TIMEOUT_MARGIN_SECONDS,
        )
    options["server_settings"] = server_settings
    options.setdefault("timeout", CONNECT_TIMEOUT_SECONDS)
    if settings.db_transaction_pooling:
        options["statement_cache_size"] = 0
    return options


def asyncpg_connector(url: str, settings: Settings) -> Connector:
    """A function that opens a new asyncpg connection as described by
    ``asyncpg_connect_arguments``. Raises what that raises."""
    arguments = asyncpg_connect_arguments(url, settings)

    async def connect() -> Any:
        return await asyncpg.connect(**arguments)

    return connect


class PostgresRevocationListener:
    """Keeps a RevocationCache complete: LISTEN, reload, heartbeat, and
    reconnect with capped exponential backoff and jitter. One per process;
    ``start`` when the server starts, ``stop`` when it has drained."""

    def __init__(
        self,
        cache: RevocationCache,
        connect: Connector,
        *,
        entry_ttl: timedelta,
        channel: str = REVOCATION_CHANNEL,
        heartbeat_interval: float = 0.25,
        heartbeat_timeout: float = 0.5,
        reload_timeout: float = 30.0,
        backoff_initial: float = 0.1,
        backoff_max: float = 5.0,
        prune_interval: float = 60.0,
        close_timeout: float = 2.0,
    ) -> None:
        self._cache = cache
        self._connect = connect
        self._entry_ttl = entry_ttl
        self._channel = channel
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._reload_timeout = reload_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._prune_interval = prune_interval
        self._close_timeout = close_timeout
        self._task: asyncio.Task[None] | None = None
        self._connection: Any = None
        self._stopping = False
        # Set when the connection is lost, so the watch loop reacts at once
        # instead of at the next heartbeat.
        self._wake = asyncio.Event()
        # Notifications that arrive during a reload, re-applied after it
        # (the reload replaces the whole set).
        self._during_reload: list[tuple[list[str], datetime]] | None = None
        self._first_attempt = asyncio.Event()
        self._loaded = False  # the current connection has completed its reload
        self.reloads = 0  # completed full loads; observable by tests and metrics

    @classmethod
    def for_database(
        cls, cache: RevocationCache, settings: Settings, database_url: str
    ) -> PostgresRevocationListener:
        """A listener on the service's database, keeping notified entries as
        long as the service's access tokens live (plus the margin the
        revocation log uses).

        Raises sqlalchemy.exc.ArgumentError for an unusable URL.
        """
        return cls(
            cache,
            asyncpg_connector(database_url, settings),
            # A notification carries ids only; the row's expire time is the
            # revoke time plus the same TTL and margin, and the revoke time
            # is before the notification's arrival, so this never ends an
            # entry early (a later end only costs a few bytes longer).
            entry_ttl=timedelta(seconds=settings.access_token_ttl_seconds) + REVOCATION_MARGIN,
        )

    @property
    def server_pid(self) -> int | None:
        """The PostgreSQL backend pid of the current connection, if any."""
        connection = self._connection
        if connection is None or connection.is_closed():
            return None
        pid: int = connection.get_server_pid()
        return pid

    async def start(self, *, ready_timeout: float = CONNECT_TIMEOUT_SECONDS) -> bool:
        """Start listening in the background and wait at most
        ``ready_timeout`` seconds for the first connect and load; returns
        whether the cache is healthy by then. A database that is down does
        not stop the start: the listener keeps retrying and the checker
        asks the database meanwhile.

        Raises RuntimeError when already started.
        """
        if self._task is not None:
            raise RuntimeError("the revocation listener is already running")
        self._stopping = False
        self._first_attempt.clear()
        self._task = asyncio.create_task(self._run(), name="usersvc-revocation-listener")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ready_timeout):
                await self._first_attempt.wait()
        return self._cache.healthy

    async def stop(self) -> None:
        """Stop listening and close the connection (gracefully, then by
        force after ``close_timeout``). Idempotent. Raises nothing."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping = True
        task.cancel()
        # wait() rather than awaiting the task: its CancelledError is not
        # ours, and a cancellation of stop() itself still propagates.
        await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            logger.error("revocation listener failed", exc_info=task.exception())
        self._cache.healthy = False

    async def _run(self) -> None:
        failures = 0
        while True:
            self._loaded = False
            try:
                await self._listen_once()
            except Exception as exc:
                # A supervisor loop: whatever ends a connection (refused,
                # lost, timed out, a missing table before migration) is
                # retried; only stop() ends the loop.
                logger.warning(
                    "revocation feed unavailable; checking the database meanwhile: %s: %s",
                    type(exc).__name__,
                    exc,
                )
            finally:
                self._cache.healthy = False
                self._first_attempt.set()
            # A connection that worked and then dropped is retried at once;
            # only a streak of failed attempts backs off further.
            failures = 1 if self._loaded else failures + 1
            await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        return equal_jitter_backoff(failures, self._backoff_initial, self._backoff_max)

    async def _listen_once(self) -> None:
        """One connection's life: connect, LISTEN, reload, then heartbeat
        until it fails. Never returns: raises what ended the connection, or
        CancelledError on stop."""
        connection = await self._connect()
        self._connection = connection
        self._wake.clear()
        try:
            connection.add_termination_listener(self._on_terminated)
            await connection.add_listener(self._channel, self._on_notification)
            await self._reload(connection)
            self._loaded = True
            self._first_attempt.set()
            logger.info("revocation feed connected", extra={"revoked_sessions": len(self._cache)})
            await self._watch(connection)
        finally:
            self._cache.healthy = False
            self._connection = None
            await self._close(connection)

    async def _reload(self, connection: Any) -> None:
        self._during_reload = []
        try:
            rows = await connection.fetch(_RELOAD_SQL, timeout=self._reload_timeout)
            self._cache.replace_all((str(row["session_id"]), row["expire_time"]) for row in rows)
            for session_ids, expire_time in self._during_reload:
                self._cache.add(session_ids, expire_time)
        finally:
            self._during_reload = None
        self._cache.healthy = True
        self.reloads += 1

    async def _watch(self, connection: Any) -> None:
        loop = asyncio.get_running_loop()
        next_prune = loop.time() + self._prune_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._heartbeat_interval):
                    await self._wake.wait()
            self._wake.clear()
            if connection.is_closed():
                raise _ConnectionLost("the database closed the revocation listener's connection")
            try:
                await connection.execute("SELECT 1", timeout=self._heartbeat_timeout)
            except TimeoutError:
                raise _ConnectionLost(
                    f"no heartbeat answer within {self._heartbeat_timeout}s"
                ) from None
            if loop.time() >= next_prune:
                # In slices, so that a mass expiry never stalls the loop; a
                # full slice goes on at the next heartbeat.
                full = self._cache.prune(limit=PRUNE_SLICE) == PRUNE_SLICE
                next_prune = loop.time() + (0 if full else self._prune_interval)

    async def _close(self, connection: Any) -> None:
        if connection.is_closed():
            return
        if not self._stopping:
            # Lost or unresponsive: a graceful goodbye could hang.
            connection.terminate()
            return
        try:
            await connection.close(timeout=self._close_timeout)
        except Exception:
            # close() has already aborted the connection.
            logger.warning("revocation listener connection closed by force")

    def _on_terminated(self, connection: Any) -> None:
        # Called by asyncpg (on the loop) when the connection closes for any
        # reason; from now on a miss in the cache proves nothing. A late call
        # for an earlier connection must not touch the current one's state.
        if connection is not self._connection:
            return
        self._cache.healthy = False
        self._wake.set()

    def _on_notification(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        session_ids = parse_payload(payload)
        expire_time = datetime.now(UTC) + self._entry_ttl
        self._cache.add(session_ids, expire_time)
        if self._during_reload is not None:
            self._during_reload.append((session_ids, expire_time))


class CachedRevocationChecker:
    """usersvc.domain.ports.RevocationChecker: the in-memory cache while it
    is healthy (no database query), the database while it is not."""

    def __init__(
        self,
        cache: RevocationCache,
        engine: AsyncEngine,
        *,
        ensure_available: Callable[[], None] | None = None,
    ) -> None:
        self._cache = cache
        self._engine = engine
        # The database monitor's breaker: while the database is known to be
        # down, the fallback fails at once instead of waiting to connect.
        self._ensure_available = ensure_available
        self.database_checks = 0  # fallback queries made; observable by tests and metrics

    async def is_revoked(self, session_id: str) -> bool:
        """Whether ``session_id`` is revoked.

        Raises DatabaseUnavailable when the cache cannot answer and the
        database cannot either.
        """
        cache = self._cache
        if cache.is_revoked(session_id):
            return True
        if cache.healthy:
            return False
        return await self._ask_database(session_id)

    async def _ask_database(self, session_id: str) -> bool:
        try:
            key = uuid.UUID(session_id)
        except ValueError:
            return False  # every stored id is a UUID
        if self._ensure_available is not None:
            self._ensure_available()
        self.database_checks += 1
        with translate_database_errors():
            async with self._engine.connect() as connection:
                result = await connection.execute(_CHECK_SQL, {"session_id": key})
                expire_time = result.scalar_one_or_none()
        if expire_time is None:
            return False
        # Remembered: revocations are never undone, so later calls for this
        # session need no query even before the feed is back.
        self._cache.add([str(key)], expire_time)
        return True
