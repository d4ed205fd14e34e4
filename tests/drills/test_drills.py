"""Fault drills: a real ``usersvc serve`` process on a private PostgreSQL
under a steady load of client tasks, every response counted.

(a) PostgreSQL stops mid-load and comes back: only OK, UNAVAILABLE /
    DATABASE_UNAVAILABLE and DEADLINE_EXCEEDED are ever answered (never
    INTERNAL or UNKNOWN), the service serves again within two seconds of the
    database's return, and every user whose creation was acknowledged exists.
(b) SIGTERM mid-load: every call the server accepted succeeds, the process
    exits 0 within the grace period.

Slow (about half a minute together): ``-m 'not slow'`` skips them. Run with
``-s`` to see the counts.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from clusters import PostgresCluster
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from .conftest import start, stop
from .support import (
    SERVING,
    Load,
    Tally,
    health_status,
    service_env,
    serving,
    sign_up,
    sigterm_under_load,
)

pytestmark = pytest.mark.slow

CLIENTS = 8
STEADY_SUCCESSES = 300
FAILURES_WHILE_DOWN = 50
RECOVERY_SECONDS = 2.0
GRACE_SECONDS = 10.0
ALLOWED_DURING_RESTART = {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}


async def stored_ids(database_url: str, ids: list[str]) -> set[str]:
    engine = create_async_engine(database_url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT id FROM users WHERE id = ANY(:ids)"),
                {"ids": [uuid.UUID(i) for i in ids]},
            )
            return {str(row[0]) for row in rows}
    finally:
        await engine.dispose()


def _down(tally: Tally) -> bool:
    return tally.count("UNAVAILABLE", "DATABASE_UNAVAILABLE") >= FAILURES_WHILE_DOWN


async def health_not_serving(address: str) -> int | None:
    """The status once it is no longer SERVING (polled, at most 5 s)."""
    status = await health_status(address)
    for _ in range(250):
        if status != SERVING:
            break
        await asyncio.sleep(0.02)  # polled: bounded by the loop
        status = await health_status(address)
    return status


# fast: PostgreSQL ends every session and checkpoints; immediate: it
# crashes, and recovery replays the WAL at the next start.
@pytest.mark.parametrize("stop_mode", ["fast", "immediate"])
async def test_a_postgresql_restart_under_load(
    pg: PostgresCluster, cluster_database_url: str, tmp_path: Path, stop_mode: str
) -> None:
    env = service_env(cluster_database_url, tmp_path / "data")
    async with serving(env, tmp_path / "serve.log") as server:
        load = Load(server.listen_addr, await sign_up(server.listen_addr, CLIENTS))
        load.start()
        try:
            await load.more_successes(STEADY_SUCCESSES)
            await stop(pg, stop_mode)
            await load.until(_down)
            not_serving = await health_not_serving(server.listen_addr)
            await start(pg)
            recovered_in = await load.more_successes(1, limit=30)
            serving_again = await health_status(server.listen_addr)
            await load.more_successes(STEADY_SUCCESSES)
        finally:
            tally = await load.stop()
        exit_code, exit_seconds = await server.sigterm_and_wait(limit=GRACE_SECONDS + 30)
    acknowledged = list(tally.acknowledged)
    lost = set(acknowledged) - await stored_ids(cluster_database_url, acknowledged)
    print(  # the drill's figures, shown with -s
        tally.report(f"PostgreSQL restart ({stop_mode} stop) under load"),
        f"\n  recovered {recovered_in:.3f}s after PostgreSQL was back;"
        f" acknowledged writes {len(acknowledged)}, lost {len(lost)}",
    )

    assert {code for code, _ in tally.by_outcome()} <= ALLOWED_DURING_RESTART
    assert {r for c, r in tally.by_outcome() if c == "UNAVAILABLE"} == {"DATABASE_UNAVAILABLE"}
    assert not_serving != SERVING
    assert recovered_in < RECOVERY_SECONDS
    assert serving_again == SERVING
    assert lost == set()
    assert (exit_code, exit_seconds < GRACE_SECONDS) == (0, True)


async def test_sigterm_under_load(
    pg: PostgresCluster, cluster_database_url: str, tmp_path: Path
) -> None:
    env = service_env(
        cluster_database_url,
        tmp_path / "data",
        USERSVC_SHUTDOWN_GRACE_SECONDS=str(GRACE_SECONDS),
    )

    drill = await sigterm_under_load(
        env, tmp_path / "serve.log", clients=CLIENTS, successes_before=STEADY_SUCCESSES
    )
    print(  # the drill's figures, shown with -s
        drill.tally.report("SIGTERM under load"),
        f"\n  exit code {drill.exit_code} after {drill.exit_seconds:.3f}s;"
        f" server answered OK {sum(drill.server_ok.values())},"
        f" clients received OK {drill.tally.successes}",
    )

    assert drill.server_failures == []
    assert drill.unexpected() == {}
    assert drill.server_ok == drill.client_ok
    assert drill.exit_code == 0
    assert drill.exit_seconds < GRACE_SECONDS
