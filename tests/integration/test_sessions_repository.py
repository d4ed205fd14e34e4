"""SqlAlchemySessionRepository on PostgreSQL: sessions, single-use refresh
tokens under concurrency, revocation (log + NOTIFY, transactional) and the
clean-up of expired rows."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.revocation_channel import MAX_PAYLOAD_BYTES, REVOCATION_CHANNEL
from usersvc.domain.errors import UserNotFound
from usersvc.domain.models import RevokeReason, Session, User
from usersvc.domain.ports import CleanupResult, RefreshOutcome, RefreshStatus, UnitOfWorkFactory
from usersvc.services.maintenance import SessionMaintenance
from usersvc.services.sessions import SessionLifetimes

UserMaker = Callable[..., Awaitable[User]]
HOUR = timedelta(hours=1)


def later(delta: timedelta = HOUR) -> datetime:
    return datetime.now(UTC) + delta


def token_hash() -> bytes:
    return hashlib.sha256(os.urandom(32)).digest()


@dataclass(frozen=True)
class Token:
    """A refresh token as the repository sees one."""

    session_id: uuid.UUID
    generation: int
    digest: bytes


FIRST_HASHES: dict[uuid.UUID, bytes] = {}


async def open_session(
    uow_factory: UnitOfWorkFactory, user: User, *, expire_time: datetime | None = None
) -> Session:
    digest = token_hash()
    async with uow_factory() as uow:
        session = await uow.sessions.create(
            user.id, expire_time or later(), refresh_hash=digest, tag_key=os.urandom(32)
        )
        await uow.commit()
    FIRST_HASHES[session.id] = digest
    return session


def first_token(session: Session) -> Token:
    return Token(session.id, 1, FIRST_HASHES[session.id])


async def use(
    uow_factory: UnitOfWorkFactory, token: Token, successor: bytes | None = None
) -> RefreshOutcome:
    async with uow_factory() as uow:
        outcome = await uow.sessions.use_refresh_token(
            token.session_id, token.generation, token.digest, successor or token_hash()
        )
        await uow.commit()
    return outcome


async def revoke_user(uow_factory: UnitOfWorkFactory, user: User, **kwargs: Any) -> list[uuid.UUID]:
    async with uow_factory() as uow:
        ids = await uow.sessions.revoke(
            reason=RevokeReason.REVOKE_ALL,
            revocation_expire_time=later(),
            user_id=user.id,
            **kwargs,
        )
        await uow.commit()
    return ids


@pytest.fixture
async def notifications(database_url: str) -> AsyncIterator[asyncio.Queue[str]]:
    """Payloads received on the revocation channel by a raw asyncpg
    connection of its own (as another replica would listen)."""
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    queue: asyncio.Queue[str] = asyncio.Queue()
    await connection.add_listener(
        REVOCATION_CHANNEL, lambda _c, _pid, _channel, payload: queue.put_nowait(payload)
    )
    try:
        yield queue
    finally:
        await connection.close()


async def next_payload(queue: asyncio.Queue[str]) -> set[str]:
    return set((await asyncio.wait_for(queue.get(), timeout=10)).split(","))


async def revocation_log(engine: AsyncEngine) -> dict[uuid.UUID, datetime]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT session_id, expire_time FROM session_revocations")
        )
        return {row.session_id: row.expire_time for row in rows}


# -- sessions ----------------------------------------------------------------------


async def test_a_new_session_is_live_and_reads_back(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    expire_time = later()
    session = await open_session(uow_factory, user, expire_time=expire_time)
    async with uow_factory() as uow:
        stored = await uow.sessions.get(session.id)
    assert stored == session
    assert (session.user_id, session.expire_time, session.revoke_time) == (
        user.id,
        expire_time,
        None,
    )
    assert session.id.version == 7


async def test_a_session_for_a_missing_user_is_user_not_found(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(UserNotFound):
            await uow.sessions.create(
                uuid.uuid4(), later(), refresh_hash=token_hash(), tag_key=os.urandom(32)
            )


async def test_an_unknown_session_reads_as_none(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.sessions.get(uuid.uuid4()) is None


# -- refresh tokens ----------------------------------------------------------------


async def test_the_first_use_of_a_refresh_token_is_ok_and_stamps_the_session(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    outcome = await use(uow_factory, first_token(session))
    assert outcome.status is RefreshStatus.OK
    assert outcome.session is not None
    assert outcome.session.id == session.id
    assert outcome.session.last_refresh_time is not None
    assert outcome.chain is not None
    assert outcome.chain.generation == 2


async def test_a_second_use_is_retired_and_names_the_session(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    await use(uow_factory, first_token(session))
    outcome = await use(uow_factory, first_token(session))
    assert outcome.status is RefreshStatus.RETIRED
    assert outcome.session is not None
    assert outcome.session.id == session.id
    assert outcome.chain is not None
    assert outcome.chain.generation == 2


async def test_the_successor_is_the_valid_token_and_its_predecessors_are_retired(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    successor = token_hash()
    await use(uow_factory, first_token(session), successor)
    second = Token(session.id, 2, successor)
    assert (await use(uow_factory, second)).status is RefreshStatus.OK
    assert (await use(uow_factory, second)).status is RefreshStatus.RETIRED


async def test_tokens_never_issued_are_unknown(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    made_up = [
        Token(uuid.uuid4(), 1, token_hash()),  # no such session
        Token(session.id, 1, token_hash()),  # the current generation, another secret
        Token(session.id, 5, FIRST_HASHES[session.id]),  # a generation not reached yet
    ]
    for token in made_up:
        assert await use(uow_factory, token) == RefreshOutcome(RefreshStatus.UNKNOWN)
    assert (await use(uow_factory, first_token(session))).status is RefreshStatus.OK


async def test_a_use_that_rolls_back_leaves_the_token_valid(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    token = first_token(session)
    async with uow_factory() as uow:
        await uow.sessions.use_refresh_token(
            token.session_id, token.generation, token.digest, token_hash()
        )
    assert (await use(uow_factory, token)).status is RefreshStatus.OK


async def test_the_chain_of_a_session_is_its_generation_and_key(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    await use(uow_factory, first_token(session))
    async with uow_factory() as uow:
        chain = await uow.sessions.refresh_chain(session.id)
        missing = await uow.sessions.refresh_chain(uuid.uuid4())
    assert chain is not None
    assert (chain.generation, len(chain.tag_key), missing) == (2, 32, None)


async def test_twenty_concurrent_uses_of_one_refresh_token_let_exactly_one_succeed(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    token = first_token(session)
    start = asyncio.Barrier(20)

    async def contend() -> RefreshStatus:
        async with uow_factory() as uow:
            await uow.sessions.get(session.id)  # hold a connection before the race starts
            await start.wait()
            outcome = await uow.sessions.use_refresh_token(
                token.session_id, token.generation, token.digest, token_hash()
            )
            await uow.commit()
        return outcome.status

    statuses = await asyncio.gather(*(contend() for _ in range(20)))
    assert sorted(s.value for s in statuses) == ["ok"] + ["retired"] * 19


async def test_uses_waiting_on_the_winner_see_the_token_retired_once_it_commits(
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
    wait_for_lock_waiters: Callable[[int], Awaitable[None]],
) -> None:
    session = await open_session(uow_factory, await make_user())
    token = first_token(session)
    async with uow_factory() as winner:
        first = await winner.sessions.use_refresh_token(
            token.session_id, token.generation, token.digest, token_hash()
        )
        waiters = [asyncio.create_task(use(uow_factory, token)) for _ in range(5)]
        await wait_for_lock_waiters(5)
        await winner.commit()
    outcomes = await asyncio.gather(*waiters)
    assert first.status is RefreshStatus.OK
    assert {o.status for o in outcomes} == {RefreshStatus.RETIRED}


async def test_when_the_winner_rolls_back_one_waiter_gets_the_token(
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
    wait_for_lock_waiters: Callable[[int], Awaitable[None]],
) -> None:
    session = await open_session(uow_factory, await make_user())
    token = first_token(session)
    async with uow_factory() as winner:
        await winner.sessions.use_refresh_token(
            token.session_id, token.generation, token.digest, token_hash()
        )
        waiters = [asyncio.create_task(use(uow_factory, token)) for _ in range(3)]
        await wait_for_lock_waiters(3)
        await winner.rollback()
    outcomes = await asyncio.gather(*waiters)
    assert sorted(o.status.value for o in outcomes) == ["ok", "retired", "retired"]


async def test_a_refresh_token_hash_must_be_32_bytes(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        with pytest.raises(Exception, match="refresh_token_hash_sha256"):
            await uow.sessions.create(
                user.id, later(), refresh_hash=b"short", tag_key=os.urandom(32)
            )


async def test_a_hundred_rotations_leave_one_row_per_session_in_every_table_touched(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, make_user: UserMaker
) -> None:
    sessions = [await open_session(uow_factory, await make_user()) for _ in range(3)]
    for session in sessions:
        token = first_token(session)
        for generation in range(1, 101):
            successor = token_hash()
            assert (await use(uow_factory, token, successor)).status is RefreshStatus.OK
            token = Token(session.id, generation + 1, successor)
    async with engine.connect() as connection:
        tables = (
            await connection.execute(
                text(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = 'public' AND table_name <> 'alembic_version'"
                )
            )
        ).scalars()
        counts = {}
        for table in sorted(tables):
            counted = await connection.execute(text(f'SELECT count(*) FROM "{table}"'))
            counts[table] = counted.scalar_one()
    print(f"\nafter 100 rotations of each of {len(sessions)} sessions, rows per table: {counts}")
    assert counts["sessions"] == len(sessions)
    assert "refresh_tokens" not in counts
    assert counts["users"] == len(sessions)
    assert sum(counts.values()) == 2 * len(sessions)  # one user row, one session row each


# -- revoking ----------------------------------------------------------------------


async def test_revoking_sessions_marks_them_and_logs_them_until_the_given_time(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, make_user: UserMaker
) -> None:
    session = await open_session(uow_factory, await make_user())
    expire_time = later(timedelta(minutes=16))
    async with uow_factory() as uow:
        ids = await uow.sessions.revoke(
            reason=RevokeReason.LOGOUT, revocation_expire_time=expire_time, session_ids=[session.id]
        )
        await uow.commit()
        stored = await uow.sessions.get(session.id)
    assert ids == [session.id]
    assert stored is not None
    assert stored.revoke_reason is RevokeReason.LOGOUT
    assert stored.revoke_time is not None
    assert await revocation_log(engine) == {session.id: expire_time}


async def test_revoking_a_revoked_session_again_changes_and_returns_nothing(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    await open_session(uow_factory, user)
    await revoke_user(uow_factory, user)
    assert await revoke_user(uow_factory, user) == []


async def test_revoking_a_users_sessions_can_spare_one(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    kept, ended = await open_session(uow_factory, user), await open_session(uow_factory, user)
    ids = await revoke_user(uow_factory, user, except_session_id=kept.id)
    async with uow_factory() as uow:
        states = [await uow.sessions.get(s.id) for s in (kept, ended)]
    assert ids == [ended.id]
    assert [s.revoke_time is None for s in states if s is not None] == [True, False]


async def test_revoking_a_users_sessions_leaves_other_users_alone(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user, other = await make_user(), await make_user()
    others = await open_session(uow_factory, other)
    await open_session(uow_factory, user)
    await revoke_user(uow_factory, user)
    async with uow_factory() as uow:
        stored = await uow.sessions.get(others.id)
    assert stored is not None
    assert stored.revoke_time is None


async def test_a_session_id_without_a_row_is_logged_anyway(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    ghost = uuid.uuid4()
    async with uow_factory() as uow:
        ids = await uow.sessions.revoke(
            reason=RevokeReason.LOGOUT, revocation_expire_time=later(), session_ids=[ghost]
        )
        await uow.commit()
    assert ids == [ghost]
    assert set(await revocation_log(engine)) == {ghost}


async def test_revoke_takes_session_ids_or_a_user_not_both(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(ValueError, match="either"):
            await uow.sessions.revoke(
                reason=RevokeReason.LOGOUT,
                revocation_expire_time=later(),
                session_ids=[uuid.uuid4()],
                user_id=uuid.uuid4(),
            )


async def test_a_committed_revocation_is_notified_with_its_session_ids(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, notifications: asyncio.Queue[str]
) -> None:
    user = await make_user()
    one, two = await open_session(uow_factory, user), await open_session(uow_factory, user)
    await revoke_user(uow_factory, user)
    assert await next_payload(notifications) == {str(one.id), str(two.id)}


async def test_a_rolled_back_revocation_is_never_notified_nor_logged(
    uow_factory: UnitOfWorkFactory,
    engine: AsyncEngine,
    make_user: UserMaker,
    notifications: asyncio.Queue[str],
) -> None:
    rolled_back, committed = await make_user(), await make_user()
    dropped = await open_session(uow_factory, rolled_back)
    sent = await open_session(uow_factory, committed)
    async with uow_factory() as uow:
        await uow.sessions.revoke(
            reason=RevokeReason.DISABLED, revocation_expire_time=later(), user_id=rolled_back.id
        )
    await revoke_user(uow_factory, committed)
    # Notifications arrive in commit order: had the first been sent, it
    # would come before this one.
    assert await next_payload(notifications) == {str(sent.id)}
    assert dropped.id not in await revocation_log(engine)


async def test_a_large_revocation_is_split_into_notifications_under_the_limit(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, notifications: asyncio.Queue[str]
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        opened = {
            (
                await uow.sessions.create(
                    user.id, later(), refresh_hash=token_hash(), tag_key=os.urandom(32)
                )
            ).id
            for _ in range(400)
        }
        await uow.commit()
    ids = await revoke_user(uow_factory, user)
    received: set[str] = set()
    payload_sizes: list[int] = []
    while len(received) < len(opened):
        payload = await asyncio.wait_for(notifications.get(), timeout=10)
        payload_sizes.append(len(payload.encode()))
        received |= set(payload.split(","))
    assert set(ids) == opened
    assert received == {str(i) for i in opened}
    assert len(payload_sizes) > 1
    assert max(payload_sizes) < MAX_PAYLOAD_BYTES


async def test_a_purge_deletes_the_sessions_but_not_the_revocation_log(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    session = await open_session(uow_factory, user)
    async with uow_factory() as uow:
        await uow.sessions.revoke(
            reason=RevokeReason.PURGED, revocation_expire_time=later(), user_id=user.id
        )
        await uow.users.purge(user.id)
        await uow.commit()
    async with engine.connect() as connection:
        left = await connection.execute(text("SELECT count(*) FROM sessions"))
        assert left.scalar_one() == 0
    assert set(await revocation_log(engine)) == {session.id}


# -- clean-up ----------------------------------------------------------------------


async def test_cleanup_deletes_sessions_expired_before_the_cutoff_with_their_tokens(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    old = await open_session(uow_factory, user, expire_time=later(-2 * HOUR))
    kept = await open_session(uow_factory, user, expire_time=later(-HOUR / 2))
    async with uow_factory() as uow:
        result = await uow.sessions.delete_expired(
            session_cutoff=later(-HOUR), revocation_cutoff=later(), limit=100
        )
        await uow.commit()
        survivors = [await uow.sessions.get(s.id) for s in (old, kept)]
    assert result.sessions == 1
    assert [s is not None for s in survivors] == [False, True]


async def test_cleanup_deletes_revocations_past_their_expire_time(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    old, current = uuid.uuid4(), uuid.uuid4()
    async with uow_factory() as uow:
        for session_id, expire_time in ((old, later(-HOUR)), (current, later())):
            await uow.sessions.revoke(
                reason=RevokeReason.LOGOUT,
                revocation_expire_time=expire_time,
                session_ids=[session_id],
            )
        await uow.commit()
    async with uow_factory() as uow:
        result = await uow.sessions.delete_expired(
            session_cutoff=later(), revocation_cutoff=later(timedelta(0)), limit=100
        )
        await uow.commit()
    assert result.revocations == 1
    assert set(await revocation_log(engine)) == {current}


async def test_cleanup_deletes_at_most_the_limit(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    for _ in range(3):
        await open_session(uow_factory, user, expire_time=later(-HOUR))
    async with uow_factory() as uow:
        result = await uow.sessions.delete_expired(
            session_cutoff=later(), revocation_cutoff=later(), limit=2
        )
        await uow.commit()
    assert result.sessions == 2


async def test_cleanup_skips_rows_another_transaction_holds_instead_of_waiting(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    held = await open_session(uow_factory, user, expire_time=later(-HOUR))
    free = await open_session(uow_factory, user, expire_time=later(-HOUR))
    async with uow_factory() as holder:
        # A concurrent revoke of the held session keeps its row locked.
        await holder.sessions.revoke(
            reason=RevokeReason.LOGOUT, revocation_expire_time=later(), session_ids=[held.id]
        )
        async with uow_factory() as cleaner:
            result = await asyncio.wait_for(
                cleaner.sessions.delete_expired(
                    session_cutoff=later(), revocation_cutoff=later(), limit=100
                ),
                timeout=10,
            )
            await cleaner.commit()
        await holder.commit()
    async with uow_factory() as uow:
        survivors = [await uow.sessions.get(s.id) for s in (held, free)]
    assert result.sessions == 1
    assert [s is not None for s in survivors] == [True, False]


async def test_a_maintenance_run_empties_what_expired_in_batches(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    live = await open_session(uow_factory, user)
    for _ in range(5):
        await open_session(uow_factory, user, expire_time=later(-2 * HOUR))
    async with uow_factory() as uow:
        await uow.sessions.revoke(
            reason=RevokeReason.LOGOUT, revocation_expire_time=later(-HOUR), user_id=user.id
        )
        await uow.commit()
    maintenance = SessionMaintenance(
        uow_factory=uow_factory,
        lifetimes=SessionLifetimes(access_ttl_seconds=60, refresh_ttl_seconds=3600),
        interval_seconds=0,
        batch_size=2,
    )
    result = await maintenance.run_once()
    async with uow_factory() as uow:
        kept = await uow.sessions.get(live.id)
    assert result == CleanupResult(sessions=5, revocations=6)
    assert kept is not None
    assert await revocation_log(engine) == {}
