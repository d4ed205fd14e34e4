"""SessionMaintenance (usersvc.services.maintenance) on fakes: what is old
enough to delete, batching, and the background timer's start and stop."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
from fakes import (
    ACCESS_TTL_SECONDS,
    REFRESH_TTL_SECONDS,
    FakeClock,
    FakeDatabase,
    StoredRevocation,
)

from usersvc.domain.models import User
from usersvc.domain.ports import CleanupResult
from usersvc.domain.revocations import REVOCATION_MARGIN
from usersvc.services.maintenance import SessionMaintenance
from usersvc.services.sessions import SessionLifetimes

# Past expiry, a session is kept one access token lifetime plus the margin.
KEEP = timedelta(seconds=ACCESS_TTL_SECONDS) + REVOCATION_MARGIN


class Harness:
    def __init__(self, *, batch_size: int = 100, interval: float = 0.0) -> None:
        self.db = FakeDatabase()
        self.clock = FakeClock()
        self.lifetimes = SessionLifetimes(
            access_ttl_seconds=ACCESS_TTL_SECONDS,
            refresh_ttl_seconds=REFRESH_TTL_SECONDS,
            clock=self.clock,
        )
        self.maintenance = SessionMaintenance(
            uow_factory=self.db.uow,
            lifetimes=self.lifetimes,
            interval_seconds=interval,
            batch_size=batch_size,
        )
        self.user: User = self.db.insert()

    async def session_expired_for(self, age: timedelta) -> uuid.UUID:
        """A session whose expire_time lies ``age`` before now."""
        async with self.db.uow() as uow:
            session = await uow.sessions.create(
                self.user.id,
                self.lifetimes.now() - age,
                refresh_hash=uuid.uuid4().bytes * 2,
                tag_key=uuid.uuid4().bytes * 2,
            )
            await uow.commit()
        return session.id

    def revocation_expiring_in(self, delta: timedelta) -> uuid.UUID:
        session_id = uuid.uuid4()
        now = self.lifetimes.now()
        self.db.revocations[session_id] = StoredRevocation(now, now + delta)
        return session_id


async def test_a_session_expired_longer_than_an_access_token_lives_is_deleted() -> None:
    h = Harness()
    old = await h.session_expired_for(KEEP + timedelta(seconds=1))
    await h.maintenance.run_once()
    assert old not in h.db.sessions


async def test_a_deleted_sessions_refresh_chain_goes_with_it() -> None:
    h = Harness()
    await h.session_expired_for(KEEP + timedelta(seconds=1))
    await h.maintenance.run_once()
    assert h.db.refresh_chains == {}


async def test_a_session_that_expired_recently_is_kept() -> None:
    h = Harness()
    recent = await h.session_expired_for(KEEP - timedelta(seconds=1))
    await h.maintenance.run_once()
    assert recent in h.db.sessions


async def test_a_live_session_is_kept() -> None:
    h = Harness()
    live = await h.session_expired_for(-timedelta(hours=1))
    await h.maintenance.run_once()
    assert live in h.db.sessions


async def test_a_revocation_past_its_expire_time_is_deleted_and_a_current_one_kept() -> None:
    h = Harness()
    old = h.revocation_expiring_in(-timedelta(seconds=1))
    current = h.revocation_expiring_in(timedelta(seconds=1))
    result = await h.maintenance.run_once()
    assert (old in h.db.revocations, current in h.db.revocations) == (False, True)
    assert result == CleanupResult(sessions=0, revocations=1)


async def test_cleanup_goes_in_batches_until_nothing_is_left() -> None:
    h = Harness(batch_size=2)
    for _ in range(5):
        await h.session_expired_for(KEEP * 2)
    commits = h.db.commits
    result = await h.maintenance.run_once()
    assert (result.sessions, h.db.sessions) == (5, {})
    assert h.db.commits - commits == 3


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SessionMaintenance(
            uow_factory=FakeDatabase().uow,
            lifetimes=SessionLifetimes(access_ttl_seconds=60, refresh_ttl_seconds=60),
            interval_seconds=1,
            batch_size=0,
        )


async def test_an_interval_of_zero_starts_no_timer() -> None:
    h = Harness(interval=0)
    h.maintenance.start()
    assert not h.maintenance.running
    await h.maintenance.stop()


async def test_the_timer_runs_the_cleanup_and_stops() -> None:
    h = Harness(interval=0.001)
    ran = asyncio.Event()
    run_once = h.maintenance.run_once

    async def observed() -> CleanupResult:
        result = await run_once()
        ran.set()
        return result

    h.maintenance.run_once = observed  # type: ignore[method-assign]
    old = await h.session_expired_for(KEEP * 2)
    h.maintenance.start()
    await asyncio.wait_for(ran.wait(), timeout=10)
    await h.maintenance.stop()
    assert old not in h.db.sessions
    assert not h.maintenance.running


async def test_the_timer_survives_a_failed_run() -> None:
    h = Harness(interval=0.001)
    calls = 0
    second_run = asyncio.Event()

    async def failing_then_fine() -> CleanupResult:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        second_run.set()
        return CleanupResult(0, 0)

    h.maintenance.run_once = failing_then_fine  # type: ignore[method-assign]
    h.maintenance.start()
    await asyncio.wait_for(second_run.wait(), timeout=10)
    await h.maintenance.stop()
    assert calls >= 2


async def test_starting_twice_is_refused() -> None:
    h = Harness(interval=3600)
    h.maintenance.start()
    assert h.maintenance.running
    with pytest.raises(RuntimeError):
        h.maintenance.start()
    await h.maintenance.stop()


async def test_stopping_twice_is_harmless() -> None:
    h = Harness(interval=3600)
    h.maintenance.start()
    await h.maintenance.stop()
    await h.maintenance.stop()
    assert not h.maintenance.running
