"""Is the database there? One answer per process, kept fresh in the
background, so that calls fail fast while it is not and the health service
tells load balancers the truth.

A probe runs every ``interval`` on a connection of the monitor's own
(``application_name`` usersvc-health, outside the pool, so a busy pool never
makes the database look down): ``SELECT 1`` within ``timeout``. A probe that
fails on the kept connection is retried at once on a fresh one (a killed
backend is not an outage); only when that fails too is the database down.

Slow is not down. A probe that fails with a connection error (refused,
reset, closed by a shutting-down server, a refused login) means down at
once. A probe that only runs out of time (the server's socket accepts, the
answer is late: PostgreSQL or the whole machine starved of CPU, a stalled
disk) is a miss; misses trip the breaker only when they go on: at least
``slow_misses`` probes in a row over at least ``slow_seconds``. A late
probe is not abandoned: its query (or connect) goes on, and the next
probes wait for that same answer instead of starting another, so a
starved machine is not also asked for a new connection every interval; an
answer, however late, ends the streak. Only an answer still missing after
``slow_seconds`` is given up (connection dropped, a fresh one next). So a
saturated machine never turns into refused calls, a stopped PostgreSQL
still trips within one interval, and one that accepts connections but
never answers is noticed after ``slow_seconds``.

While it is down, ``ensure_available`` raises DatabaseUnavailable at once:
a unit of work does not wait for a connect timeout or a pool timeout to
learn what the monitor already knows (a circuit breaker, open). The probes
go on; the first that succeeds closes the breaker again, so the service
recovers by itself within about one interval of the database's return.
A call that meets a connection failure while the monitor still believes in
the database reports it (``report_failure``), which runs a probe at once
instead of at the next tick.

Listeners (the server's health service) hear every change.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import asyncpg  # type: ignore[import-untyped]

from usersvc.adapters.revocations import asyncpg_connect_arguments
from usersvc.config import Settings
from usersvc.domain.errors import DatabaseUnavailable

logger = logging.getLogger(__name__)

MONITOR_APPLICATION_NAME = "usersvc-health"
# However many calls report failures, probes keep at least this far apart.
MIN_PROBE_GAP_SECONDS = 0.05
# Probes that only time out trip the breaker once this many in a row have,
# over at least this long.
SLOW_MISSES = 3
SLOW_SECONDS = 10.0


class ProbeResult(enum.Enum):
    ANSWERED = "answered"
    REFUSED = "refused"  # a connection error: the database is down
    LATE = "late"  # no answer within the timeout: slow, or hanging


Connector = Callable[[], Awaitable[Any]]  # -> asyncpg.Connection
Listener = Callable[[bool], Awaitable[None]]


class DatabaseAvailability(Protocol):
    """What a unit of work asks of the monitor."""

    def ensure_available(self) -> None:
        """Raises DatabaseUnavailable while the database is known to be down."""

    def report_failure(self) -> None:
        """A call met a connection failure: check the database now."""


class DatabaseMonitor:
    """usersvc.adapters.db_monitor.DatabaseAvailability, kept by probes.
    ``start`` with the server, ``stop`` after it has drained."""

    def __init__(
        self,
        connect: Connector,
        *,
        interval: float,
        timeout: float,
        close_timeout: float = 2.0,
        slow_misses: int = SLOW_MISSES,
        slow_seconds: float = SLOW_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Late probes trip the breaker after ``slow_misses`` in a row over
        at least ``slow_seconds`` (by ``clock``). Raises ValueError for a
        non-positive interval or timeout, fewer than one miss or a negative
        window."""
        if interval <= 0 or timeout <= 0:
            raise ValueError("the probe interval and timeout must be positive")
        if slow_misses < 1 or slow_seconds < 0:
            raise ValueError("need slow_misses >= 1 and slow_seconds >= 0")
        self._slow_misses = slow_misses
        self._slow_seconds = slow_seconds
        self._clock = clock
        self._late_since: float | None = None
        self._late_count = 0
        # The probe query still running after its probe gave up waiting,
        # and since when: the next probes wait for it.
        self._pending: asyncio.Task[ProbeResult] | None = None
        self._pending_since = 0.0
        self._connect = connect
        self._interval = interval
        self._timeout = timeout
        self._close_timeout = close_timeout
        # Believed until a probe says otherwise: a monitor that has not
        # started yet must not refuse anything.
        self._available = True
        self._connection: Any = None
        self._listeners: list[Listener] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.probes = 0  # probes run; observable by tests and metrics
        self.late_probes = 0  # probes that ran out of time

    @classmethod
    def for_database(cls, settings: Settings, database_url: str) -> DatabaseMonitor:
        """A monitor of the service's database with the probe settings.
        Raises ValueError for a probe interval of 0 (the monitor is off:
        do not build one), sqlalchemy.exc.ArgumentError for an unusable URL.
        """
        arguments = asyncpg_connect_arguments(
            database_url, settings, application_name=MONITOR_APPLICATION_NAME
        )
        # A probe waits only its timeout, but a connect that is merely slow
        # may finish in the background (see the module's docstring): bounded
        # by the slow window, not by the connect timeout meant for the pool.
        arguments["timeout"] = max(settings.db_probe_timeout_seconds, SLOW_SECONDS)

        async def connect() -> Any:
            return await asyncpg.connect(**arguments)

        return cls(
            connect,
            interval=settings.db_probe_interval_seconds,
            timeout=settings.db_probe_timeout_seconds,
        )

    @property
    def available(self) -> bool:
        return self._available

    def ensure_available(self) -> None:
        """Raises DatabaseUnavailable while the last probe failed."""
        if not self._available:
            raise DatabaseUnavailable()

    def report_failure(self) -> None:
        """Probe now rather than at the next tick. Raises nothing."""
        if self._available:
            self._wake.set()

    def add_listener(self, listener: Listener) -> None:
        """``listener(available)`` is awaited on every change, in the
        monitor's task; what it raises is logged and ignored."""
        self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        """Raises nothing when ``listener`` was not added."""
        with contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    async def start(self) -> bool:
        """Probe once (at most ``timeout`` seconds), then keep probing in
        the background. Returns whether the database is available.
        Raises RuntimeError when already started."""
        if self._task is not None:
            raise RuntimeError("the database monitor is already running")
        await self.probe()
        self._task = asyncio.create_task(self._run(), name="usersvc-db-monitor")
        return self._available

    async def stop(self) -> None:
        """Stop probing and close the connection. Idempotent. Raises nothing."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        self._drop_pending()
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            try:
                await connection.close(timeout=self._close_timeout)
            except Exception:
                # close() has aborted the connection already.
                logger.warning("database monitor connection closed by force")

    async def probe(self) -> bool:
        """Check the database now and update the state (telling the
        listeners of a change). Returns whether it is available. Raises
        nothing but CancelledError."""
        self.probes += 1
        if self._pending is None:
            self._pending = asyncio.create_task(self._select_one(), name="usersvc-db-probe")
            self._pending_since = self._clock()
        pending = self._pending
        try:
            async with asyncio.timeout(self._timeout):
                result = await asyncio.shield(pending)
        except TimeoutError:
            result = ProbeResult.LATE
            if self._clock() - self._pending_since >= self._slow_seconds:
                # No answer for the whole window: give up on it, and on its
                # connection; the next probe starts afresh.
                self._drop_pending()
        else:
            self._pending = None
        await self._set(self._judge(result))
        return self._available

    def _drop_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None and not pending.done():
            pending.cancel()
            self._discard()

    def _judge(self, result: ProbeResult) -> bool:
        """Availability after a probe's result: the state machine."""
        if result is ProbeResult.ANSWERED:
            self._late_since, self._late_count = None, 0
            return True
        if result is ProbeResult.REFUSED:
            self._late_since, self._late_count = None, 0
            return False
        self.late_probes += 1
        now = self._clock()
        if self._late_since is None:
            self._late_since = now
        self._late_count += 1
        if self._late_count >= self._slow_misses and now - self._late_since >= self._slow_seconds:
            return False
        if self._available and self._late_count == 1:
            logger.warning(
                "database probe got no answer within %.2f s; "
                "counted as down only if that goes on for %.0f s",
                self._timeout,
                self._slow_seconds,
            )
        # A late answer proves nothing either way: the state stays.
        return self._available

    async def _select_one(self) -> ProbeResult:
        if self._connection is not None:
            try:
                await self._connection.execute("SELECT 1")
            except Exception:
                # Killed, restarted or broken: the database may still be
                # fine, which a new connection shows.
                self._discard()
            else:
                return ProbeResult.ANSWERED
        try:
            self._connection = await self._connect()
            await self._connection.execute("SELECT 1")
        except TimeoutError:
            # asyncpg's own connect timeout: as late as the probe's.
            self._discard()
            return ProbeResult.LATE
        except Exception as exc:
            # Whatever stops a fresh connection from answering (refused,
            # unreachable, shutting down, refused login) means: not usable.
            self._discard()
            if self._available:
                logger.warning("database probe failed: %s: %s", type(exc).__name__, exc)
            return ProbeResult.REFUSED
        return ProbeResult.ANSWERED

    def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            # No goodbye: on a broken connection it could hang.
            connection.terminate()

    async def _set(self, available: bool) -> None:
        if available == self._available:
            return
        self._available = available
        if available:
            logger.info("database available again")
        else:
            logger.error("database unavailable: calls fail fast until a probe succeeds")
        for listener in list(self._listeners):
            try:
                await listener(available)
            except Exception:
                logger.exception("database availability listener failed")

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            await self.probe()
            await asyncio.sleep(min(MIN_PROBE_GAP_SECONDS, self._interval))
