"""Fixtures of the fault drills: a private PostgreSQL (tests/clusters.py)
that the drills stop, restart and crash, with a migrated database on it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from clusters import PostgresCluster, private_cluster
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

DRILL_DATABASE = "usersvc"


@pytest.fixture(scope="module")
def cluster() -> Iterator[PostgresCluster]:
    with private_cluster() as started:
        yield started


@pytest.fixture
def pg(cluster: PostgresCluster) -> Iterator[PostgresCluster]:
    """The module's cluster, running again after the test whatever the
    test did to it."""
    yield cluster
    if not cluster.is_running():
        cluster.start()


@pytest.fixture(scope="module")
async def cluster_database_url(cluster: PostgresCluster) -> str:
    """A migrated usersvc database on the private cluster."""
    from usersvc.adapters.migrations import upgrade_async

    engine = create_async_engine(cluster.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.exec_driver_sql(f'CREATE DATABASE "{DRILL_DATABASE}"')
    finally:
        await engine.dispose()
    url = cluster.url_for(DRILL_DATABASE)
    await upgrade_async(url)
    return url


async def stop(cluster: PostgresCluster, mode: str = "fast") -> None:
    """pg_ctl stop off the event loop, which keeps serving meanwhile."""
    await asyncio.to_thread(cluster.stop, mode)


async def start(cluster: PostgresCluster) -> None:
    """pg_ctl start (returns once PostgreSQL accepts connections)."""
    await asyncio.to_thread(cluster.start)
