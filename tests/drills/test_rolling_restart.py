"""Rolling restarts under load, with real processes: two replicas of
``usersvc serve`` on one database, clients balancing round_robin over both
(``ipv4:127.0.0.1:A,127.0.0.1:B``), 300 calls/s of GetUser, GetJwks and
idempotent CreateUser for 30 s (longer when the restarts take longer, so
that both happen under load), and each replica in turn stopped with SIGTERM
and started again once the other is back in the clients' rotation.

Through ``usersvc.client`` with a 5 s drain, no call may fail: the clients
watch health, so they stop sending to a replica the moment it reports
NOT_SERVING, while it still serves what was already on the way; by the
time it stops accepting calls (GOAWAY) none arrive any more. Through bare
grpc stubs (round_robin and health checking, but no retries) the drill
counts the failures with and without the drain; with it, there are none of
those a stop causes (CANCELLED, UNAVAILABLE from grpc). What the shared
machine adds (DEADLINE_EXCEEDED, DATABASE_UNAVAILABLE when PostgreSQL runs
out of connections) is printed but not compared.

Slow (about two minutes together): ``-m 'not slow'`` skips them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from .rolling import (
    ClientLoad,
    Outcomes,
    RawLoad,
    Replica,
    replica_envs,
    rolling_restart,
)

# Each rolling restart takes 30 s of load plus starting processes, which on
# a busy machine takes a while: more than the suite's default 120 s.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

RATE = 300.0
SECONDS = 30.0
FIRST_RESTART_AFTER = 3.0
DRAIN_SECONDS = 5.0
GRACE_SECONDS = 10.0
# SIGTERM to exit: the drain, the calls in flight, closing the pool.
STOP_LIMIT = DRAIN_SECONDS + GRACE_SECONDS + 30.0


@asynccontextmanager
async def replicas_for(
    database_url: str, base: Path, drain_seconds: float
) -> AsyncIterator[list[Replica]]:
    """Two replicas, both SERVING; killed on exit if still running."""
    await asyncio.to_thread(base.mkdir, parents=True, exist_ok=True)
    envs = replica_envs(
        database_url, base, drain_seconds=drain_seconds, grace_seconds=GRACE_SECONDS
    )
    replicas = [Replica(name, env, base) for name, env in zip("ab", envs, strict=True)]
    try:
        for replica in replicas:
            await replica.start()
        yield replicas
    finally:
        for replica in replicas:
            await replica.close()


@pytest.fixture
async def drained(database_url: str, tmp_path: Path) -> AsyncIterator[list[Replica]]:
    async with replicas_for(database_url, tmp_path, DRAIN_SECONDS) as replicas:
        yield replicas


async def raw_rolling_restart(replicas: list[Replica]) -> Outcomes:
    async with RawLoad(replicas) as load:
        await rolling_restart(
            replicas,
            load.call,
            rate=RATE,
            seconds=SECONDS,
            first_restart_after=FIRST_RESTART_AFTER,
            stop_limit=STOP_LIMIT,
        )
    return load.outcomes


async def test_usersvc_client_sees_no_failed_call_while_each_replica_restarts(
    drained: list[Replica],
) -> None:
    async with ClientLoad(drained) as load:
        await rolling_restart(
            drained,
            load.call,
            rate=RATE,
            seconds=SECONDS,
            first_restart_after=FIRST_RESTART_AFTER,
            stop_limit=STOP_LIMIT,
        )
    print(load.outcomes.report("usersvc.client, rolling restart, 5 s drain"))
    print("stops (exit code, seconds):", [replica.stops for replica in drained])
    assert [code for replica in drained for code, _ in replica.stops] == [0, 0]
    assert load.outcomes.calls >= int(RATE * SECONDS)
    assert load.outcomes.failed == 0, load.outcomes.report("failures")


# One test, so that both figures are printed side by side and compared.
async def test_bare_grpc_clients_fail_no_more_with_the_drain_than_without(
    database_url: str, tmp_path: Path
) -> None:
    async with replicas_for(database_url, tmp_path / "without", 0.0) as replicas:
        without = await raw_rolling_restart(replicas)
    print(without.report("bare grpc, rolling restart, no drain"))
    async with replicas_for(database_url, tmp_path / "with", DRAIN_SECONDS) as replicas:
        drained = await raw_rolling_restart(replicas)
    print(drained.report("bare grpc, rolling restart, 5 s drain"))
    assert min(without.calls, drained.calls) >= int(RATE * SECONDS)
    assert drained.refused <= without.refused
    # Health-checking clients are gone before the stop begins: none dropped.
    assert drained.refused == 0, drained.report("failures with the drain")
