"""DatabaseMonitor with a scripted database: the breaker, the probes and the
listeners. (Against a real PostgreSQL that stops and starts:
tests/e2e/test_database_outage.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from usersvc.adapters.db_monitor import DatabaseMonitor
from usersvc.adapters.unit_of_work import SqlAlchemyUnitOfWork
from usersvc.domain.errors import DatabaseUnavailable

WAIT_SECONDS = 5.0


class FakeConnection:
    def __init__(self, database: FakeDatabase) -> None:
        self._database = database
        self.closed = False
        self.broken = False

    async def execute(self, query: str) -> str:
        if self.closed or self.broken or not self._database.up:
            raise ConnectionResetError("connection lost")
        if self._database.hang:
            # Answers once the database stops hanging (late), unless the
            # monitor gives up first.
            await self._database.answering.wait()
            if self.closed or not self._database.up:
                raise ConnectionResetError("connection lost")
        self._database.statements.append(query)
        return "SELECT 1"

    def is_closed(self) -> bool:
        return self.closed

    def terminate(self) -> None:
        self.closed = True

    async def close(self, timeout: float) -> None:  # noqa: ASYNC109 - asyncpg's signature
        self.closed = True


class FakeDatabase:
    """Up or down; a hanging one accepts connections but never answers."""

    def __init__(self) -> None:
        self.up = True
        self.answering = asyncio.Event()
        self.answering.set()
        self.connections: list[FakeConnection] = []
        self.statements: list[str] = []

    @property
    def hang(self) -> bool:
        return not self.answering.is_set()

    @hang.setter
    def hang(self, hanging: bool) -> None:
        if hanging:
            self.answering.clear()
        else:
            self.answering.set()

    async def connect(self) -> FakeConnection:
        if not self.up:
            raise ConnectionRefusedError("connection refused")
        connection = FakeConnection(self)
        self.connections.append(connection)
        return connection


class Changes:
    """A listener that records every change and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[bool] = []
        self._changed = asyncio.Condition()

    async def __call__(self, available: bool) -> None:
        async with self._changed:
            self.seen.append(available)
            self._changed.notify_all()

    async def wait_for(self, count: int) -> None:
        async with asyncio.timeout(WAIT_SECONDS), self._changed:
            await self._changed.wait_for(lambda: len(self.seen) >= count)


@pytest.fixture
def database() -> FakeDatabase:
    return FakeDatabase()


@pytest.fixture
async def monitors() -> Any:
    started: list[DatabaseMonitor] = []
    yield started
    for monitor in started:
        await monitor.stop()


def make_monitor(
    database: FakeDatabase, monitors: list[DatabaseMonitor], **options: float
) -> DatabaseMonitor:
    options.setdefault("interval", 3600.0)  # probes only when the test asks
    options.setdefault("timeout", 0.2)
    monitor = DatabaseMonitor(database.connect, **options)
    monitors.append(monitor)
    return monitor


async def test_a_monitor_that_was_never_started_refuses_nothing(database: FakeDatabase) -> None:
    monitor = DatabaseMonitor(database.connect, interval=1.0, timeout=1.0)

    monitor.ensure_available()

    assert monitor.available


async def test_a_failed_probe_makes_every_call_fail_fast_with_database_unavailable(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    database.up = False
    monitor = make_monitor(database, monitors)

    started_available = await monitor.start()

    assert not started_available
    with pytest.raises(DatabaseUnavailable):
        monitor.ensure_available()


async def test_a_successful_probe_closes_the_breaker_again(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    database.up = False
    monitor = make_monitor(database, monitors)
    await monitor.start()

    database.up = True
    await monitor.probe()

    monitor.ensure_available()


async def test_listeners_hear_the_database_go_and_come_back(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    monitor = make_monitor(database, monitors)
    changes = Changes()
    monitor.add_listener(changes)
    await monitor.start()

    database.up = False
    await monitor.probe()
    database.up = True
    await monitor.probe()

    assert changes.seen == [False, True]


async def test_the_background_probe_notices_the_database_coming_back(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    database.up = False
    monitor = make_monitor(database, monitors, interval=0.05)
    await monitor.start()
    changes = Changes()
    monitor.add_listener(changes)

    database.up = True
    await changes.wait_for(1)

    assert changes.seen == [True]


async def test_a_killed_connection_is_replaced_without_the_database_counting_as_down(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    monitor = make_monitor(database, monitors)
    changes = Changes()
    monitor.add_listener(changes)
    await monitor.start()

    database.connections[0].broken = True
    available = await monitor.probe()

    assert available
    assert changes.seen == []
    assert len(database.connections) == 2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def slow_monitor(
    database: FakeDatabase, monitors: list[DatabaseMonitor], clock: FakeClock
) -> DatabaseMonitor:
    """Late after 0.02 s; trips on 3 late probes in a row over 10 s."""
    monitor = DatabaseMonitor(
        database.connect,
        interval=3600.0,
        timeout=0.02,
        slow_misses=3,
        slow_seconds=10.0,
        clock=clock,
    )
    monitors.append(monitor)
    return monitor


async def late_probes(monitor: DatabaseMonitor, clock: FakeClock, *gaps: float) -> list[bool]:
    """One probe after each gap (seconds on the fake clock); what each said."""
    said = []
    for gap in gaps:
        clock.now += gap
        said.append(await monitor.probe())
    return said


async def test_a_database_that_never_answers_counts_as_down_once_it_has_been_late_long_enough(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    database.hang = True
    said = await late_probes(monitor, clock, 0, 5, 4.9, 0.1)

    assert said == [True, True, True, False]
    assert monitor.late_probes == 4


async def test_late_probes_in_quick_succession_do_not_trip_before_the_window(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    database.hang = True
    said = await late_probes(monitor, clock, *([0.5] * 19))

    assert said == [True] * 19
    monitor.ensure_available()


async def test_a_long_window_with_too_few_late_probes_does_not_trip(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    database.hang = True
    said = await late_probes(monitor, clock, 0, 60)

    assert said == [True, True]


async def test_one_answer_in_time_ends_the_streak_of_late_probes(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    database.hang = True
    before = await late_probes(monitor, clock, 0, 5)
    database.hang = False
    answered = await late_probes(monitor, clock, 1)
    database.hang = True
    after = await late_probes(monitor, clock, 1, 5, 3.9)

    # 15 s of mostly late probes, but never 10 s of them in a row.
    assert (before, answered, after) == ([True, True], [True], [True, True, True])


async def test_a_refused_connection_trips_at_once_even_in_a_streak_of_late_probes(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    database.hang = True
    late = await late_probes(monitor, clock, 0, 1)
    database.hang = False
    database.up = False
    refused = await late_probes(monitor, clock, 0.1)

    assert (late, refused) == ([True, True], [False])


async def test_late_probes_keep_a_tripped_breaker_open_and_an_answer_closes_it(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    changes = Changes()
    monitor.add_listener(changes)
    await monitor.start()

    database.up = False
    down = await late_probes(monitor, clock, 0)
    database.up = True
    database.hang = True
    late = await late_probes(monitor, clock, 1)
    database.hang = False
    back = await late_probes(monitor, clock, 1)

    assert (down, late, back) == ([False], [False], [True])
    assert changes.seen == [False, True]


async def test_a_slow_connect_counts_as_late_not_as_refused(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    async def connect_timing_out() -> FakeConnection:
        raise TimeoutError  # what asyncpg.connect raises after its timeout

    monitor._connect = connect_timing_out
    database.connections[0].broken = True
    said = await late_probes(monitor, clock, 0, 5, 5)

    assert said == [True, True, False]


async def test_late_probes_wait_for_the_same_answer_instead_of_opening_connections(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    database.hang = True
    late = await late_probes(monitor, clock, 1, 1, 1, 1)
    database.hang = False
    answered = await late_probes(monitor, clock, 1)

    assert (late, answered) == ([True] * 4, [True])
    assert len(database.connections) == 1
    assert database.statements == ["SELECT 1"] * 2  # start's, then the late one's


async def test_an_answer_missing_for_the_whole_window_is_given_up_with_its_connection(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    clock = FakeClock()
    monitor = slow_monitor(database, monitors, clock)
    await monitor.start()

    database.hang = True
    said = await late_probes(monitor, clock, 0, 5, 5)
    given_up = database.connections[0].closed
    again = await late_probes(monitor, clock, 1)

    assert (said, given_up, again) == ([True, True, False], True, [False])
    assert len(database.connections) == 2


def test_an_unusable_slow_window_is_refused(database: FakeDatabase) -> None:
    with pytest.raises(ValueError, match="slow_misses"):
        DatabaseMonitor(database.connect, interval=1.0, timeout=1.0, slow_misses=0)
    with pytest.raises(ValueError, match="slow_seconds"):
        DatabaseMonitor(database.connect, interval=1.0, timeout=1.0, slow_seconds=-1)


async def test_a_reported_failure_runs_a_probe_before_the_interval_is_up(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    monitor = make_monitor(database, monitors, interval=3600.0)
    changes = Changes()
    monitor.add_listener(changes)
    await monitor.start()

    database.up = False
    monitor.report_failure()
    await changes.wait_for(1)

    assert changes.seen == [False]


async def test_a_failing_listener_does_not_stop_the_others(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    async def broken(available: bool) -> None:
        raise RuntimeError("listener bug")

    monitor = make_monitor(database, monitors)
    changes = Changes()
    monitor.add_listener(broken)
    monitor.add_listener(changes)
    await monitor.start()

    database.up = False
    await monitor.probe()

    assert changes.seen == [False]


async def test_a_removed_listener_hears_nothing_more(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    monitor = make_monitor(database, monitors)
    changes = Changes()
    monitor.add_listener(changes)
    await monitor.start()

    monitor.remove_listener(changes)
    database.up = False
    await monitor.probe()

    assert changes.seen == []


async def test_stop_closes_the_probe_connection(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    monitor = make_monitor(database, monitors)
    await monitor.start()

    await monitor.stop()

    assert all(connection.closed for connection in database.connections)


async def test_starting_twice_is_refused(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    monitor = make_monitor(database, monitors)
    await monitor.start()

    with pytest.raises(RuntimeError):
        await monitor.start()


class _NoSessions:
    def __call__(self) -> Any:
        raise AssertionError("the unit of work must not open a session")


async def test_a_unit_of_work_fails_fast_while_the_database_is_down(
    database: FakeDatabase, monitors: list[DatabaseMonitor]
) -> None:
    database.up = False
    monitor = make_monitor(database, monitors)
    await monitor.start()
    uow = SqlAlchemyUnitOfWork(_NoSessions(), monitor)  # type: ignore[arg-type]

    with pytest.raises(DatabaseUnavailable):
        async with uow:
            pass


def test_a_probe_interval_of_zero_is_refused(database: FakeDatabase) -> None:
    with pytest.raises(ValueError, match="positive"):
        DatabaseMonitor(database.connect, interval=0, timeout=1.0)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    # The monitor logs every change at WARNING/ERROR; expected here.
    caplog.set_level("CRITICAL", logger="usersvc.adapters.db_monitor")
