"""Alembic migrations: they apply, revert and re-apply cleanly, agree with the
ORM models, and find their database from the caller or the environment."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import alembic.command
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, pool, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from usersvc.adapters import migrations
from usersvc.adapters.orm import metadata

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_TABLES = {table.name for table in metadata.sorted_tables}


async def table_names(url: str) -> set[str]:
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()
    return set(names) - {"alembic_version"}


async def test_upgrade_downgrade_and_upgrade_again_on_a_fresh_database(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await migrations.upgrade_async(url)
    after_upgrade = (await migrations.current_async(url), await table_names(url))
    await migrations.downgrade_async(url, "base")
    after_downgrade = (await migrations.current_async(url), await table_names(url))
    await migrations.upgrade_async(url)
    after_second_upgrade = (await migrations.current_async(url), await table_names(url))

    head = migrations.head()
    assert head is not None
    assert after_upgrade == (head, SCHEMA_TABLES)
    assert after_downgrade == (None, set())
    assert after_second_upgrade == (head, SCHEMA_TABLES)


async def _events_schema(url: str) -> tuple[list[str], dict[str, str]]:
    """The events table's own triggers and its indexes' definitions."""
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            triggers = await connection.scalars(
                text(
                    "SELECT tgname FROM pg_trigger "
                    "WHERE tgrelid = 'events'::regclass AND NOT tgisinternal"
                )
            )
            indexes = await connection.execute(
                text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'events'")
            )
            return list(triggers), {name: definition for name, definition in indexes}
    finally:
        await engine.dispose()


async def test_the_events_table_has_no_notify_trigger_and_its_downgrade_brings_it_back(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await migrations.upgrade_async(url, "0007")
    triggers, indexes = await _events_schema(url)
    await migrations.downgrade_async(url, "0006")
    old_triggers, old_indexes = await _events_schema(url)

    assert triggers == []
    assert old_triggers == ["events_inserted"]
    partial = {"uq_events_sequence", "ix_events_user_id_sequence", "ix_events_type_sequence",
               "ix_events_actor_sequence", "ix_events_create_time"}  # fmt: skip
    numbered_only = "WHERE (sequence IS NOT NULL)"
    assert {name for name, definition in indexes.items() if numbered_only in definition} == partial
    assert not any(numbered_only in old_indexes[name] for name in partial)
    assert set(old_indexes) == set(indexes)


async def _run(url: str, *statements: str) -> list[object]:
    """Each statement in one transaction; the first column of the last
    statement's rows."""
    engine = create_async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.begin() as connection:
            rows: list[object] = []
            for statement in statements:
                result = await connection.execute(text(statement))
                rows = list(result.scalars()) if result.returns_rows else []
            return rows
    finally:
        await engine.dispose()


async def test_the_relay_mark_starts_below_the_first_unpublished_event_and_goes_back_on_downgrade(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await migrations.upgrade_async(url, "0007")
    # Numbered 1..5; 1, 2 and 4 published (4 out of order: it stays
    # unpublished as far as the mark can tell, and is sent again).
    await _run(
        url,
        "INSERT INTO events (id, type, sequence, published_at) "
        "SELECT gen_random_uuid(), 't', g, CASE WHEN g IN (1, 2, 4) THEN now() END "
        "FROM generate_series(1, 5) g",
    )
    await migrations.upgrade_async(url, "0008")
    mark = await _run(url, "SELECT published_through FROM event_relay_mark")
    numbered = await _run(url, "SELECT usersvc_number_events(1, 10, 'c')")
    await migrations.downgrade_async(url, "0007")
    published = await _run(
        url, "SELECT sequence FROM events WHERE published_at IS NOT NULL ORDER BY sequence"
    )

    assert (mark, numbered, published) == ([2], [0], [1, 2])


async def test_a_database_never_migrated_has_no_current_revision(
    empty_database_url: str,
) -> None:
    assert await migrations.current_async(empty_database_url) is None


async def test_autogenerate_finds_no_drift_between_the_models_and_the_migrated_schema(
    database_url: str,
) -> None:
    def compare(connection: Connection) -> list[object]:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, metadata))

    engine = create_async_engine(database_url, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            differences = await connection.run_sync(compare)
    finally:
        await engine.dispose()
    assert differences == []


async def upgrade_in_another_process(url: str) -> int:
    # Alembic keeps its migration context in module globals, so concurrent
    # migrations are a matter of processes (replicas), not threads.
    environment = dict(os.environ)
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(PROJECT_ROOT), environment.get("PYTHONPATH")])
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sys; from usersvc.adapters.migrations import upgrade; upgrade(sys.argv[1])",
        url,
        env=environment,
    )
    return await process.wait()


async def wait_for_advisory_lock_waiters(connection: AsyncConnection, count: int) -> None:
    query = text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
    async with asyncio.timeout(30):
        # Polling: PostgreSQL has no notification for "a session now waits".
        while (await connection.execute(query)).scalar_one() < count:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_replicas_migrating_at_once_take_turns_on_the_migration_lock(
    empty_database_url: str,
) -> None:
    engine = create_async_engine(
        empty_database_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as gate:
            # Hold the lock so that all three start before any of them runs.
            await gate.execute(
                text("SELECT pg_advisory_lock(:key)"), {"key": migrations.MIGRATION_LOCK_KEY}
            )
            replicas = [
                asyncio.create_task(upgrade_in_another_process(empty_database_url))
                for _ in range(3)
            ]
            await wait_for_advisory_lock_waiters(gate, 3)
            await gate.execute(
                text("SELECT pg_advisory_unlock(:key)"), {"key": migrations.MIGRATION_LOCK_KEY}
            )
            exit_codes = await asyncio.gather(*replicas)
    finally:
        await engine.dispose()
    assert exit_codes == [0, 0, 0]
    assert await migrations.current_async(empty_database_url) == migrations.head()


async def test_migrations_run_from_any_working_directory(
    empty_database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    await migrations.upgrade_async(empty_database_url)
    assert await migrations.current_async(empty_database_url) == migrations.head()


@pytest.mark.parametrize("variable", ["USERSVC_MIGRATION_DATABASE_URL", "USERSVC_DATABASE_URL"])
async def test_without_a_url_from_the_caller_env_py_reads_the_environment(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.delenv("USERSVC_MIGRATION_DATABASE_URL", raising=False)
    monkeypatch.delenv("USERSVC_DATABASE_URL", raising=False)
    monkeypatch.setenv(variable, empty_database_url)
    config = migrations.alembic_config()
    await asyncio.to_thread(alembic.command.upgrade, config, "head")
    assert await migrations.current_async(empty_database_url) == migrations.head()


async def test_the_migration_url_wins_over_the_service_url(
    empty_database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USERSVC_MIGRATION_DATABASE_URL", empty_database_url)
    monkeypatch.setenv(
        "USERSVC_DATABASE_URL", "postgresql+asyncpg://nobody@127.0.0.1:1/does_not_exist"
    )
    await asyncio.to_thread(alembic.command.upgrade, migrations.alembic_config(), "head")
    assert await migrations.current_async(empty_database_url) == migrations.head()
