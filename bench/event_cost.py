"""The cost of the event write, for the ``events`` scenario (bench/events.py).

A write with its event and the same write without it are measured side by
side in one run: alternating chunks of each (the order flips every chunk),
so that what else the machine does at the time weighs on both alike. Per
variant: writes/s over its chunks' wall time, and the CPU per write of this
process plus the database's backends (``cpu_us``; read from /proc, so only
when PostgreSQL runs on this machine, else NaN). CPU time is what a loaded
machine disturbs least.

Writes go the way the service sends them (bench/events.py: UpdateUser of a
display name through the write lane, CreateUser through the write lane, and
with a request id through a unit of work).
Two shapes: one write after the other, with nothing numbering the events
meanwhile (the write alone), and IN_FLIGHT writes at a time as a server
runs them, with the events feed running and woken after each commit that
wrote events (usersvc.adapters.event_wakeup); each chunk with events then
lasts until its events are numbered (what the feed has not numbered by the
chunk's last commit, a pass of the measurement numbers at once), so the
numbering is paid inside the measurement.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.event_feed import PostgresEventFeed
from usersvc.adapters.event_wakeup import SequencerWakeup, notify_through
from usersvc.adapters.events import sequence_pending
from usersvc.adapters.revocations import asyncpg_connector
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.adapters.write_lane import SqlAlchemyUserWriter
from usersvc.config import Settings
from usersvc.domain.ports import UnitOfWorkFactory

from .results import Measurement
from .scenarios import InProcessRun

# Units of work at a time in the concurrent runs, as a server runs them
# (its pool holds 20 connections by default).
IN_FLIGHT = 16
# Writes per variant per chunk: one connection / all in flight together.
SEQUENTIAL_CHUNK = 100
IN_FLIGHT_CHUNK = IN_FLIGHT * 8
_TICK = os.sysconf("SC_CLK_TCK")
BACKENDS_SQL = "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
_BACKENDS = text(BACKENDS_SQL)


@dataclass(frozen=True)
class Lanes:
    """How a server writes: units of work, and UpdateUser's write lane."""

    uow_factory: UnitOfWorkFactory
    writer: SqlAlchemyUserWriter


# write(lanes, task, count): ``count`` writes of task ``task``.
Write = Callable[[Lanes, int, int], Awaitable[None]]


@dataclass(frozen=True)
class WritePair:
    """The same write without and with its event."""

    without: Write
    with_event: Write


def _process_cpu(pid: int) -> float | None:
    # utime + stime of a PostgreSQL process on this machine, in seconds.
    try:
        if Path(f"/proc/{pid}/comm").read_text().strip() != "postgres":
            return None
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _backend_cpu(engine: AsyncEngine) -> dict[int, float]:
    """CPU seconds so far of each backend of the database that is a process
    of this machine (none when PostgreSQL runs elsewhere)."""
    async with engine.connect() as conn:
        pids = (await conn.execute(_BACKENDS)).scalars().all()
    return local_cpu(pids)


def local_cpu(pids: Iterable[int]) -> dict[int, float]:
    """CPU seconds so far of each of ``pids`` that is a PostgreSQL process
    of this machine."""
    found = {pid: _process_cpu(pid) for pid in pids}
    return {pid: seconds for pid, seconds in found.items() if seconds is not None}


def cpu_since(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds the processes of ``after`` spent since ``before`` (one
    not in ``before`` started meanwhile: all of its)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in after.items())


@dataclass
class _Tally:
    writes: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    backends_seen: bool = True

    def measurement(self, loadavg: float) -> Measurement:
        cpu_us = self.cpu / self.writes * 1e6 if self.backends_seen else float("nan")
        return Measurement(
            rps=self.writes / self.wall, cpu_us=cpu_us, requests=self.writes, loadavg_1m=loadavg
        )


async def measure_pair(
    engine: AsyncEngine,
    settings: Settings,
    url: str,
    pair: WritePair,
    *,
    writes: int,
    in_flight: int,
) -> tuple[Measurement, Measurement]:
    """Measurements of ``pair.without`` and ``pair.with_event``, about
    ``writes`` writes each, ``in_flight`` units of work at a time (1: one
    connection, nothing numbering; more: the feed numbering, woken)."""
    loadavg = os.getloadavg()[0]
    chunk = SEQUENTIAL_CHUNK if in_flight == 1 else IN_FLIGHT_CHUNK
    share = max(1, chunk // in_flight)
    chunks = max(1, round(writes / (share * in_flight)))
    # Start from nothing to number: the earlier runs leave events behind.
    while await sequence_pending(engine):
        pass
    feed: PostgresEventFeed | None = None
    wakeup: SequencerWakeup | None = None
    lanes = Lanes(make_uow_factory(engine), SqlAlchemyUserWriter(engine))
    if in_flight > 1:
        feed = PostgresEventFeed(asyncpg_connector(url, settings))
        wakeup = SequencerWakeup(feed=feed, notify=notify_through(engine))
        lanes = Lanes(
            make_uow_factory(engine, events_committed=wakeup.events_committed),
            SqlAlchemyUserWriter(engine, events_committed=wakeup.events_committed),
        )
        await feed.start()
    tallies = {False: _Tally(), True: _Tally()}
    try:
        if feed is not None and not await feed.wait_listening(30.0):
            raise RuntimeError("the events feed did not connect in 30 s")
        numbered = feed.latest if feed is not None else 0
        for n in range(chunks):
            for with_event in (False, True) if n % 2 == 0 else (True, False):
                tally = tallies[with_event]
                write = pair.with_event if with_event else pair.without
                backends = await _backend_cpu(engine)
                cpu, started = time.process_time(), time.perf_counter()
                await asyncio.gather(*(write(lanes, task, share) for task in range(in_flight)))
                if with_event and feed is not None:
                    numbered += share * in_flight
                    # The chunk's last events are numbered now, by a pass
                    # of the measurement's own (its time and CPU count),
                    # instead of after the feed's pause between passes: a
                    # stream of writes does not wait for that pause, and
                    # in a chunk of 128 writes it would be a third of the
                    # time measured (usersvc.adapters.event_feed).
                    while await sequence_pending(engine):
                        pass
                    await feed.wait_beyond(numbered - 1, 60.0)
                    if feed.latest < numbered:
                        raise RuntimeError(f"events not numbered in 60 s ({feed.latest})")
                tally.wall += time.perf_counter() - started
                tally.cpu += time.process_time() - cpu
                tally.writes += share * in_flight
                after = await _backend_cpu(engine)
                tally.backends_seen &= bool(after)
                tally.cpu += cpu_since(backends, after)
    finally:
        if wakeup is not None:
            await wakeup.aclose()
        if feed is not None:
            await feed.stop()
    return tallies[False].measurement(loadavg), tallies[True].measurement(loadavg)


def paired_runs(
    keys: tuple[str, str],
    description: str,
    measure: Callable[[float], Awaitable[tuple[Measurement, Measurement]]],
) -> Sequence[InProcessRun]:
    """Two runs (without, with the event) of one paired measurement: the
    first of them that the runner calls in a round measures both (given the
    round's seconds per run) and hands its result to the other."""
    handed: dict[str, Measurement] = {}

    def run(index: int) -> InProcessRun:
        key, other = keys[index], keys[1 - index]

        async def measure_run(seconds: float) -> Measurement:
            if key in handed:
                return handed.pop(key)
            both = await measure(seconds)
            handed[other] = both[1 - index]
            return both[index]

        return InProcessRun(key, measure_run, description)

    return [run(0), run(1)]
