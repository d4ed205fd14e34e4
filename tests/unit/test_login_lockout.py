"""Temporary locks after failed logins: AuthService.login on the fakes, with
a FakeClock, and the lock arithmetic of usersvc.domain.lockout.

Real bcrypt at cost 4 (about a millisecond)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import bcrypt
import pytest
from fakes import FakeClock, FakeDatabase, auth_service

from usersvc.domain.errors import InvalidCredentials
from usersvc.domain.lockout import MAX_DOUBLINGS, LockoutPolicy
from usersvc.domain.models import User
from usersvc.services.auth import AuthService
from usersvc.services.passwords import BcryptPasswordHasher

PASSWORD = "correct horse battery staple"
WRONG = "not the password"
POLICY = LockoutPolicy(max_failures=3, lockout_seconds=60, max_lockout_seconds=300)


@dataclass
class Harness:
    db: FakeDatabase
    clock: FakeClock
    auth: AuthService

    def add_user(self, email: str = "ann@example.com", **fields: bool) -> User:
        password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()
        return self.db.insert(email, password_hash=password_hash, **fields)

    async def fail(self, times: int = 1, email: str = "ann@example.com") -> None:
        for _ in range(times):
            with pytest.raises(InvalidCredentials):
                await self.auth.login(email=email, password=WRONG)

    async def login_works(self, email: str = "ann@example.com") -> bool:
        try:
            await self.auth.login(email=email, password=PASSWORD)
        except InvalidCredentials:
            return False
        return True


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    built = auth_service(hasher, lockout=POLICY)
    yield Harness(built.db, built.clock, built.service)
    hasher.close()


# --- the policy's arithmetic ---------------------------------------------------


def test_each_repeat_lock_lasts_twice_as_long_as_the_one_before() -> None:
    policy = LockoutPolicy(max_failures=5, lockout_seconds=60, max_lockout_seconds=3600)
    assert [policy.lock_seconds(n) for n in range(4)] == [60, 120, 240, 480]


def test_no_lock_lasts_longer_than_the_maximum() -> None:
    policy = LockoutPolicy(max_failures=5, lockout_seconds=60, max_lockout_seconds=3600)
    assert policy.lock_seconds(6) == 3600
    assert policy.lock_seconds(10**9) == 3600


def test_doublings_are_capped_so_the_arithmetic_stays_small() -> None:
    policy = LockoutPolicy(max_failures=1, lockout_seconds=1, max_lockout_seconds=2**40)
    assert policy.lock_seconds(10**9) == 2**MAX_DOUBLINGS


@pytest.mark.parametrize(
    ("max_failures", "lockout_seconds", "max_lockout_seconds"),
    [(0, 60, 60), (5, 0, 60), (5, 61, 60)],
    ids=["no failures allowed", "zero length", "maximum below the first length"],
)
def test_a_policy_that_cannot_work_is_refused(
    max_failures: int, lockout_seconds: int, max_lockout_seconds: int
) -> None:
    with pytest.raises(ValueError, match=r"must|need"):
        LockoutPolicy(max_failures, lockout_seconds, max_lockout_seconds)


# --- login -------------------------------------------------------------------------


async def test_fewer_failures_than_the_maximum_leave_the_account_usable(h: Harness) -> None:
    h.add_user()
    await h.fail(POLICY.max_failures - 1)
    assert await h.login_works()


async def test_after_the_maximum_of_failures_the_right_password_gets_invalid_credentials(
    h: Harness,
) -> None:
    h.add_user()
    await h.fail(POLICY.max_failures)
    with pytest.raises(InvalidCredentials) as caught:
        await h.auth.login(email="ann@example.com", password=PASSWORD)
    assert (caught.value.reason, caught.value.message) == (
        "INVALID_CREDENTIALS",
        "invalid email or password",
    )


async def test_a_refusal_during_a_lock_costs_one_bcrypt_check_at_the_configured_cost(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.add_user()
    await h.fail(POLICY.max_failures)
    costs: list[int] = []
    real = bcrypt.checkpw

    def spy(password: bytes, hashed: bytes) -> bool:
        costs.append(int(hashed.split(b"$")[2]))
        return real(password, hashed)

    monkeypatch.setattr(bcrypt, "checkpw", spy)
    with pytest.raises(InvalidCredentials):
        await h.auth.login(email="ann@example.com", password=PASSWORD)
    assert costs == [4]


async def test_the_account_opens_again_when_the_lock_ends(h: Harness) -> None:
    h.add_user()
    await h.fail(POLICY.max_failures)
    h.clock.advance(POLICY.lockout_seconds)
    assert await h.login_works()


async def test_attempts_during_a_lock_neither_count_nor_extend_it(h: Harness) -> None:
    user = h.add_user()
    await h.fail(POLICY.max_failures)
    locked = h.db.rows[user.id]
    h.clock.advance(POLICY.lockout_seconds - 1)
    await h.fail(10)
    assert h.db.rows[user.id] == locked
    h.clock.advance(1)
    assert await h.login_works()


async def test_a_success_resets_the_failure_count(h: Harness) -> None:
    h.add_user()
    await h.fail(POLICY.max_failures - 1)
    assert await h.login_works()
    await h.fail(POLICY.max_failures - 1)
    assert await h.login_works()


async def test_the_attempt_that_reaches_the_maximum_succeeds_with_the_right_password(
    h: Harness,
) -> None:
    user = h.add_user()
    await h.fail(POLICY.max_failures - 1)
    assert await h.login_works()
    row = h.db.rows[user.id]
    assert (row.failed_login_count, row.lock_count, row.locked_until) == (0, 0, None)


async def test_a_repeat_lock_lasts_twice_as_long(h: Harness) -> None:
    h.add_user()
    await h.fail(POLICY.max_failures)
    h.clock.advance(POLICY.lockout_seconds)
    await h.fail(POLICY.max_failures)
    h.clock.advance(2 * POLICY.lockout_seconds - 1)
    assert not await h.login_works()
    h.clock.advance(1)
    assert await h.login_works()


async def test_locks_grow_no_longer_than_the_maximum(h: Harness) -> None:
    h.add_user()
    for locks in range(5):
        await h.fail(POLICY.max_failures)
        h.clock.advance(POLICY.lock_seconds(locks))
    await h.fail(POLICY.max_failures)
    h.clock.advance(POLICY.max_lockout_seconds)
    assert await h.login_works()


async def test_a_success_after_a_lock_starts_the_next_lock_at_the_first_length(
    h: Harness,
) -> None:
    h.add_user()
    await h.fail(POLICY.max_failures)
    h.clock.advance(POLICY.lockout_seconds)
    assert await h.login_works()
    await h.fail(POLICY.max_failures)
    h.clock.advance(POLICY.lockout_seconds)
    assert await h.login_works()


async def test_email_case_variants_share_one_counter(h: Harness) -> None:
    h.add_user()
    await h.fail(1, email="ANN@example.com")
    await h.fail(1, email="Ann@Example.com")
    await h.fail(1, email="ann@EXAMPLE.COM")
    assert not await h.login_works()


async def test_failures_for_an_unknown_email_leave_nothing_behind(h: Harness) -> None:
    ann = h.add_user()
    before = dict(h.db.rows)
    await h.fail(POLICY.max_failures + 2, email="ghost@example.com")
    assert h.db.rows == before
    assert list(h.db.rows) == [ann.id]


async def test_failures_on_a_disabled_account_count_too(h: Harness) -> None:
    user = h.add_user(disabled=True)
    await h.fail(POLICY.max_failures - 1)
    assert h.db.rows[user.id].failed_login_count == POLICY.max_failures - 1


async def test_a_lock_is_logged_with_the_user_id_and_never_the_password(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    user = h.add_user()
    with caplog.at_level(logging.WARNING, logger="usersvc.services.auth"):
        await h.fail(POLICY.max_failures)
        await h.fail(2)
    locks = [r for r in caplog.records if "locked" in r.getMessage()]
    assert [getattr(r, "user_id", None) for r in locks] == [str(user.id)]
    assert not any(WRONG in r.getMessage() or WRONG in str(r.__dict__) for r in caplog.records)


async def test_the_right_password_for_a_disabled_account_counts_nothing(h: Harness) -> None:
    user = h.add_user(disabled=True)
    for _ in range(POLICY.max_failures + 1):
        assert not await h.login_works()
    row = h.db.rows[user.id]
    assert (row.failed_login_count, row.lock_count, row.locked_until) == (0, 0, None)


async def test_a_right_password_checked_while_others_locked_the_account_is_refused(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wrong guesses that finish while the right one is being checked lock
    # the account first: the right one is then refused, as if it had come
    # after them, and no session starts.
    user = h.add_user()
    hasher = h.auth._hasher
    check = hasher.verify

    async def verify_while_others_lock(password: str, password_hash: str) -> bool:
        matches = await check(password, password_hash)
        if password == PASSWORD:
            await h.fail(POLICY.max_failures)
        return matches

    monkeypatch.setattr(hasher, "verify", verify_while_others_lock)
    assert not await h.login_works()
    assert h.db.sessions == {}
    assert h.db.rows[user.id].lock_count == 1


async def test_a_login_cancelled_during_its_check_counts_nothing(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    user = h.add_user()
    checking = asyncio.Event()

    async def endless_verify(password: str, password_hash: str) -> bool:
        checking.set()
        await asyncio.Event().wait()  # never finishes: the caller gives up first
        return False

    monkeypatch.setattr(h.auth._hasher, "verify", endless_verify)
    attempt = asyncio.create_task(h.auth.login(email="ann@example.com", password=WRONG))
    await checking.wait()
    attempt.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attempt
    assert h.db.rows[user.id].failed_login_count == 0
