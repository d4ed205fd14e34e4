"""Migration 0006 on a database with sessions of the old scheme (one
refresh_tokens row per token ever issued): the rows per session before and
after, the one valid token of each session still working once (then
recognised as retired), and the way back down."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from usersvc.adapters import migrations
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.domain.ports import RefreshStatus

ROTATIONS = 100


@pytest.fixture
async def old_engine(empty_database_url: str) -> AsyncIterator[AsyncEngine]:
    await migrations.upgrade_async(empty_database_url, "0005")
    engine = create_async_engine(empty_database_url, poolclass=NullPool)
    yield engine
    await engine.dispose()


async def old_scheme_session(engine: AsyncEngine, rotations: int) -> tuple[uuid.UUID, bytes]:
    """A session refreshed ``rotations`` times as the old code did it: every
    token a row, each retired one stamped. Returns the session id and the
    hash of its one unused token."""
    user_id, session_id = uuid.uuid4(), uuid.uuid4()
    hashes = [hashlib.sha256(os.urandom(32)).digest() for _ in range(rotations + 1)]
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "INSERT INTO users (id, email, password_hash, roles) "
                "VALUES (:id, :email, 'x', ARRAY['user'])"
            ),
            {"id": user_id, "email": f"{user_id}@example.com"},
        )
        await connection.execute(
            text(
                "INSERT INTO sessions (id, user_id, expire_time) "
                "VALUES (:id, :user_id, now() + interval '1 hour')"
            ),
            {"id": session_id, "user_id": user_id},
        )
        for index, digest in enumerate(hashes):
            await connection.execute(
                text(
                    "INSERT INTO refresh_tokens (token_hash, session_id, use_time) "
                    "VALUES (:digest, :id, CASE WHEN :used THEN now() END)"
                ),
                {"digest": digest, "id": session_id, "used": index < rotations},
            )
    return session_id, hashes[-1]


async def rows_of(engine: AsyncEngine, session_id: uuid.UUID) -> dict[str, int]:
    """Rows that belong to the session, in every table that has any."""
    async with engine.connect() as connection:
        tables = set(
            (
                await connection.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = 'public'"
                    )
                )
            ).scalars()
        )
        counts = {
            "sessions": (
                await connection.execute(
                    text("SELECT count(*) FROM sessions WHERE id = :id"), {"id": session_id}
                )
            ).scalar_one()
        }
        if "refresh_tokens" in tables:
            counts["refresh_tokens"] = (
                await connection.execute(
                    text("SELECT count(*) FROM refresh_tokens WHERE session_id = :id"),
                    {"id": session_id},
                )
            ).scalar_one()
    return counts


async def test_the_migration_keeps_one_row_per_session_and_the_valid_token_working(
    old_engine: AsyncEngine, empty_database_url: str
) -> None:
    session_id, valid = await old_scheme_session(old_engine, ROTATIONS)
    retired_before = (await old_scheme_session(old_engine, 1))[0]
    before = await rows_of(old_engine, session_id)

    await migrations.upgrade_async(empty_database_url)
    after = await rows_of(old_engine, session_id)
    print(
        f"\nrows of a session refreshed {ROTATIONS} times: old scheme {before} "
        f"({sum(before.values())}), after migration 0006 {after} ({sum(after.values())})"
    )

    uow_factory = make_uow_factory(old_engine)
    async with uow_factory() as uow:
        first = await uow.sessions.use_legacy_refresh_token(valid, os.urandom(32), os.urandom(32))
        await uow.commit()
    async with uow_factory() as uow:
        again = await uow.sessions.use_legacy_refresh_token(valid, os.urandom(32), os.urandom(32))
        chain = await uow.sessions.refresh_chain(session_id)
        untouched = await uow.sessions.refresh_chain(retired_before)

    assert before == {"sessions": 1, "refresh_tokens": ROTATIONS + 1}
    assert after == {"sessions": 1}
    assert first.status is RefreshStatus.OK
    assert first.chain is not None
    assert first.chain.generation == 1
    assert again.status is RefreshStatus.RETIRED
    assert chain is not None
    assert chain.generation == 1
    assert untouched is None


async def test_down_again_the_legacy_tokens_go_back_to_refresh_tokens(
    old_engine: AsyncEngine, empty_database_url: str
) -> None:
    session_id, valid = await old_scheme_session(old_engine, 3)
    await migrations.upgrade_async(empty_database_url)
    await migrations.downgrade_async(empty_database_url, "0005")
    async with old_engine.connect() as connection:
        rows = (
            await connection.execute(
                text(
                    "SELECT token_hash, use_time IS NULL FROM refresh_tokens WHERE session_id = :id"
                ),
                {"id": session_id},
            )
        ).all()
    assert [(bytes(digest), unused) for digest, unused in rows] == [(valid, True)]
