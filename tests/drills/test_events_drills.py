"""Events drills: real ``usersvc serve`` processes publishing to a private
nats-server, on a private PostgreSQL, while things fail.

(a) NATS stopped for 30 s while 1,000 writes run: no call fails, and once
    NATS is back all 1,000 events are on the stream, in order, none lost.
(b) The publishing replica is SIGKILLed mid-stream: the other one takes
    over within 5 s; no event is lost; a duplicate, if any, has the same id.
(c) PostgreSQL restarts while the relay publishes a backlog: none lost.

Slow (about two minutes together): ``-m 'not slow'`` skips them. Run with
``-s`` to see the figures.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import nats
import pytest
from clusters import PostgresCluster
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from nats_servers import PrivateNats

from usersvc_protos.v1 import event_service_pb2, user_service_pb2, user_service_pb2_grpc

from .conftest import start, stop
from .support import new_email, new_password, service_env, serving

pytestmark = pytest.mark.slow

STREAM = "USERSVC_EVENTS"
CREATED = "usersvc.user.created.v1"


@pytest.fixture
def private_nats(tmp_path: Path) -> Any:
    server = PrivateNats(store_dir=tmp_path / "nats-store")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _env(database_url: str, data_dir: Path, nats: PrivateNats, source: str) -> dict[str, str]:
    return service_env(
        database_url,
        data_dir,
        USERSVC_NATS_URL=nats.url,
        USERSVC_EVENT_SOURCE=source,
    )


async def _create_users(address: str, count: int, *, workers: int = 20) -> tuple[int, list[str]]:
    """``count`` anonymous CreateUser calls from ``workers`` tasks; returns
    the failures and the ids created."""
    failures = 0
    ids: list[str] = []
    queue = list(range(count))

    async def worker() -> None:
        nonlocal failures
        async with grpc.aio.insecure_channel(address) as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)
            while queue:
                queue.pop()
                try:
                    response = await users.CreateUser(
                        user_service_pb2.CreateUserRequest(
                            email=new_email("events"), password=new_password()
                        ),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError:
                    failures += 1
                else:
                    ids.append(response.user.id)

    await asyncio.gather(*(worker() for _ in range(workers)))
    return failures, ids


async def _stream_events(
    nats_url: str, source: str, user_ids: set[str], limit: float = 60.0
) -> list[tuple[Any, event_service_pb2.Event]]:
    """Every message of ``source`` on the stream until one user.created of
    each of ``user_ids`` has come, duplicates included, in stream order."""
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        received: list[tuple[Any, event_service_pb2.Event]] = []
        missing = set(user_ids)
        async with asyncio.timeout(limit):
            # The relay creates the stream with its first publish.
            while True:
                try:
                    await js.stream_info(STREAM)
                    break
                except NotFoundError:
                    await asyncio.sleep(0.1)
            sub = await js.subscribe(
                "usersvc.>",
                stream=STREAM,
                ordered_consumer=True,
                config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
            )
            try:
                while missing:
                    message = await sub.next_msg(timeout=limit)
                    if (message.headers or {}).get("ce-source") != source:
                        continue
                    event = event_service_pb2.Event.FromString(message.data)
                    received.append((message, event))
                    if event.type == CREATED:
                        missing.discard(event.user_id)
            finally:
                await sub.unsubscribe()  # also ends the consumer's heartbeat task
        return received
    finally:
        await client.close()


def _check_order(received: Sequence[tuple[Any, event_service_pb2.Event]]) -> int:
    """In sequence order (a duplicate repeats an earlier id); returns the
    number of duplicates."""
    seen: dict[str, int] = {}
    last = 0
    duplicates = 0
    for message, event in received:
        assert message.headers["Nats-Msg-Id"] == event.id
        if event.id in seen:
            assert seen[event.id] == event.sequence
            duplicates += 1
            continue
        assert event.sequence > last, (event.sequence, last)
        seen[event.id] = event.sequence
        last = event.sequence
    return duplicates


async def test_nats_down_for_30_seconds_during_1000_writes_loses_nothing(
    cluster_database_url: str, tmp_path: Path, private_nats: PrivateNats
) -> None:
    source = f"drill-{uuid.uuid4().hex[:8]}"
    env = _env(cluster_database_url, tmp_path, private_nats, source)
    async with serving(env, tmp_path / "serve.log") as server:
        private_nats.stop()
        stopped = time.monotonic()
        began = time.monotonic()
        failures, ids = await _create_users(server.listen_addr, 1000)
        writing = time.monotonic() - began
        # The outage lasts 30 s whatever the writes took: the scenario's
        # length, not a wait for something to happen.
        await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - stopped)))
        private_nats.start()
        back = time.monotonic()
        received = await _stream_events(private_nats.url, source, set(ids), limit=120)
        drained = time.monotonic() - back
        log = server.log()
    assert failures == 0
    assert len(ids) == 1000
    duplicates = _check_order(received)
    created = {e.user_id for _, e in received if e.type == CREATED}
    assert set(ids) <= created
    # The outage is logged once, not per event or per attempt.
    assert log.count("NATS unavailable") == 1
    print(
        f"\nNATS down 30 s: 1000 writes in {writing:.1f} s, 0 failed; all on the stream "
        f"{drained:.1f} s after NATS returned; {duplicates} duplicates"
    )


async def test_another_replica_takes_over_publishing_when_the_publisher_is_killed(
    cluster_database_url: str, tmp_path: Path, private_nats: PrivateNats
) -> None:
    source = f"drill-{uuid.uuid4().hex[:8]}"
    first_env = _env(cluster_database_url, tmp_path / "a", private_nats, source)
    second_env = _env(cluster_database_url, tmp_path / "b", private_nats, source)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    async with (
        serving(first_env, tmp_path / "a.log") as first,
        serving(second_env, tmp_path / "b.log") as second,
    ):
        replicas = [first, second]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not any("this replica publishes" in r.log() for r in replicas):
            assert loop.time() < deadline
            await asyncio.sleep(0.05)
        publisher = next(r for r in replicas if "this replica publishes" in r.log())
        survivor = next(r for r in replicas if r is not publisher)
        writes = asyncio.ensure_future(_create_users(survivor.listen_addr, 600, workers=4))
        # Mid-stream: a second into the writes (the scenario's timing).
        await asyncio.sleep(1.0)
        publisher.process.kill()
        killed = loop.time()
        while "this replica publishes" not in survivor.log():
            assert loop.time() - killed < 5.0, "no takeover within 5 s"
            await asyncio.sleep(0.02)
        takeover = loop.time() - killed
        failures, ids = await writes
        received = await _stream_events(private_nats.url, source, set(ids), limit=120)
    assert failures == 0
    duplicates = _check_order(received)
    assert set(ids) <= {e.user_id for _, e in received if e.type == CREATED}
    print(
        f"\npublisher SIGKILLed: takeover in {takeover:.2f} s, 600 writes, 0 lost, "
        f"{duplicates} duplicates (same ids)"
    )


async def test_a_postgresql_restart_while_publishing_loses_nothing(
    pg: PostgresCluster, cluster_database_url: str, tmp_path: Path, private_nats: PrivateNats
) -> None:
    source = f"drill-{uuid.uuid4().hex[:8]}"
    env = _env(cluster_database_url, tmp_path, private_nats, source)
    async with serving(env, tmp_path / "serve.log") as server:
        # A backlog: written while NATS is away, published once it returns.
        private_nats.stop()
        failures, ids = await _create_users(server.listen_addr, 500)
        assert failures == 0
        private_nats.start()
        await stop(pg)
        await start(pg)
        received = await _stream_events(private_nats.url, source, set(ids), limit=120)
    duplicates = _check_order(received)
    assert set(ids) <= {e.user_id for _, e in received if e.type == CREATED}
    print(f"\nPostgreSQL restarted while publishing 500: 0 lost, {duplicates} duplicates")
