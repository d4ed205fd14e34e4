"""AuthService.login on PostgreSQL under concurrency: only checked wrong
passwords count towards a lock, so any number of simultaneous logins with
the right password never lock the account, and simultaneous wrong ones lock
it exactly as the same number one after the other do. Real bcrypt at cost 4
on two threads, so the attempts really overlap."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import bcrypt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.domain.errors import InvalidCredentials
from usersvc.domain.lockout import LockoutPolicy
from usersvc.domain.models import User
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.services.auth import AuthService
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.sessions import SessionLifetimes, SessionRevoker
from usersvc.services.tokens import KeyRing, SigningKey, TokenService

UserMaker = Callable[..., Awaitable[User]]

PASSWORD = "correct horse battery staple"
WRONG = "not the password"
POLICY = LockoutPolicy(max_failures=3, lockout_seconds=60, max_lockout_seconds=300)


class NothingRevoked:
    async def is_revoked(self, session_id: str) -> bool:
        return False


def auth_service(
    uow_factory: UnitOfWorkFactory, hasher: BcryptPasswordHasher, policy: LockoutPolicy
) -> AuthService:
    lifetimes = SessionLifetimes(access_ttl_seconds=300, refresh_ttl_seconds=3600)
    return AuthService(
        uow_factory=uow_factory,
        hasher=hasher,
        tokens=TokenService(
            KeyRing(SigningKey.ed25519(Ed25519PrivateKey.generate())),
            issuer="usersvc",
            audience="usersvc",
            access_ttl_seconds=300,
        ),
        revocations=NothingRevoked(),
        sessions=SessionRevoker(lifetimes=lifetimes, on_revoked=None),
        lockout=policy,
    )


@pytest.fixture
async def hasher() -> AsyncIterator[BcryptPasswordHasher]:
    built = BcryptPasswordHasher(rounds=4, max_threads=2)
    yield built
    built.close()


@pytest.fixture
def auth(uow_factory: UnitOfWorkFactory, hasher: BcryptPasswordHasher) -> AuthService:
    return auth_service(uow_factory, hasher, POLICY)


@pytest.fixture
def account(make_user: UserMaker) -> Callable[[str], Awaitable[User]]:
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(4)).decode()

    async def make(email: str) -> User:
        return await make_user(email=email, password_hash=password_hash)

    return make


async def lock_state(engine: AsyncEngine, user_id: uuid.UUID) -> tuple[int, int, bool]:
    """(failed_login_count, lock_count, locked now)."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT failed_login_count, lock_count, "
                    "coalesce(locked_until > now(), false) FROM users WHERE id = :id"
                ),
                {"id": user_id},
            )
        ).one()
    return row[0], row[1], row[2]


async def outcome(auth: AuthService, email: str, password: str) -> str:
    try:
        await auth.login(email=email, password=password)
    except InvalidCredentials:
        return "INVALID_CREDENTIALS"
    return "OK"


async def sessions_of(engine: AsyncEngine, user_id: uuid.UUID) -> int:
    async with engine.connect() as connection:
        found = await connection.execute(
            text("SELECT count(*) FROM sessions WHERE user_id = :id"), {"id": user_id}
        )
    return int(found.scalar_one())


@pytest.mark.parametrize("logins", [5, 20])
async def test_concurrent_logins_with_the_right_password_all_succeed_and_never_lock(
    auth: AuthService,
    account: Callable[[str], Awaitable[User]],
    engine: AsyncEngine,
    logins: int,
) -> None:
    user = await account("ann@example.com")
    outcomes = await asyncio.gather(
        *(outcome(auth, "ann@example.com", PASSWORD) for _ in range(logins))
    )
    print(
        f"\n{logins} concurrent right-password logins: {outcomes.count('OK')} OK, "
        f"{outcomes.count('INVALID_CREDENTIALS')} INVALID_CREDENTIALS"
    )
    assert outcomes == ["OK"] * logins
    assert await lock_state(engine, user.id) == (0, 0, False)
    assert await sessions_of(engine, user.id) == logins
    # And the account still takes the owner afterwards.
    assert await outcome(auth, "ann@example.com", PASSWORD) == "OK"


@pytest.mark.parametrize("logins", [5, 20])
async def test_concurrent_wrong_passwords_lock_exactly_as_sequential_ones(
    auth: AuthService,
    account: Callable[[str], Awaitable[User]],
    engine: AsyncEngine,
    logins: int,
) -> None:
    sequential = await account("seq@example.com")
    concurrent = await account("con@example.com")
    for _ in range(logins):
        assert await outcome(auth, "seq@example.com", WRONG) == "INVALID_CREDENTIALS"
    outcomes = await asyncio.gather(
        *(outcome(auth, "con@example.com", WRONG) for _ in range(logins))
    )
    expected = await lock_state(engine, sequential.id)
    found = await lock_state(engine, concurrent.id)
    print(f"\n{logins} wrong logins: sequential {expected}, concurrent {found}")
    assert outcomes == ["INVALID_CREDENTIALS"] * logins
    assert expected == (0, 1, True)
    assert found == expected
    # Locked: the right password gets the same one answer.
    assert await outcome(auth, "con@example.com", PASSWORD) == "INVALID_CREDENTIALS"


@pytest.mark.parametrize("logins", [5, 20])
async def test_right_and_wrong_passwords_at_once_count_only_the_wrong_ones(
    uow_factory: UnitOfWorkFactory,
    hasher: BcryptPasswordHasher,
    account: Callable[[str], Awaitable[User]],
    engine: AsyncEngine,
    logins: int,
) -> None:
    # A maximum never reached, to see every failure counted.
    roomy = LockoutPolicy(max_failures=1000, lockout_seconds=60, max_lockout_seconds=60)
    auth = auth_service(uow_factory, hasher, roomy)
    user = await account("ann@example.com")
    wrongs = await asyncio.gather(*(outcome(auth, "ann@example.com", WRONG) for _ in range(logins)))
    assert wrongs == ["INVALID_CREDENTIALS"] * logins
    assert await lock_state(engine, user.id) == (logins, 0, False)
    # Right ones at once with more wrong ones: each success clears the
    # count, so what is left is at most the wrong ones, never a right one.
    mixed = await asyncio.gather(
        *(outcome(auth, "ann@example.com", PASSWORD) for _ in range(logins)),
        *(outcome(auth, "ann@example.com", WRONG) for _ in range(logins)),
    )
    assert mixed == ["OK"] * logins + ["INVALID_CREDENTIALS"] * logins
    failed, locks, locked = await lock_state(engine, user.id)
    assert (failed <= logins, locks, locked) == (True, 0, False)


async def test_unknown_emails_and_locked_accounts_write_nothing(
    auth: AuthService, account: Callable[[str], Awaitable[User]], engine: AsyncEngine
) -> None:
    user = await account("ann@example.com")
    for _ in range(POLICY.max_failures):
        await outcome(auth, "ann@example.com", WRONG)
    before = await lock_state(engine, user.id)
    outcomes = await asyncio.gather(
        *(outcome(auth, "ann@example.com", WRONG) for _ in range(5)),
        *(outcome(auth, "nobody@example.com", PASSWORD) for _ in range(5)),
    )
    assert outcomes == ["INVALID_CREDENTIALS"] * 10
    assert await lock_state(engine, user.id) == before
    async with engine.connect() as connection:
        users = await connection.execute(text("SELECT count(*) FROM users"))
    assert users.scalar_one() == 1
