"""AuthService (usersvc.services.auth): login, key set, authentication.

Real bcrypt at cost 4 (about a millisecond), fakes for storage."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import bcrypt
import pytest
from fakes import ACCESS_TTL_SECONDS, AuthServiceHarness, FakeDatabase, auth_service

from usersvc.domain.errors import InvalidCredentials, TokenInvalid
from usersvc.domain.models import PrincipalKind, User
from usersvc.services.auth import AuthService
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.tokens import TokenService

PASSWORD = "correct horse battery staple"
TTL = ACCESS_TTL_SECONDS


@dataclass
class Harness:
    db: FakeDatabase
    hasher: BcryptPasswordHasher
    tokens: TokenService
    auth: AuthService
    built: AuthServiceHarness

    def with_hasher(self, hasher: BcryptPasswordHasher) -> AuthService:
        """An AuthService like ``auth`` on the same fakes, with ``hasher``."""
        return AuthService(
            uow_factory=self.db.uow,
            hasher=hasher,
            tokens=self.tokens,
            revocations=self.built.revocations,
            sessions=self.built.revoker,
        )

    def add_user(
        self, email: str = "ann@example.com", *, rounds: int = 4, **fields: object
    ) -> User:
        password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds)).decode()
        return self.db.insert(email, password_hash=password_hash, **fields)  # type: ignore[arg-type]


@pytest.fixture
async def h() -> AsyncIterator[Harness]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=2)
    built = auth_service(hasher)
    yield Harness(built.db, hasher, built.tokens, built.service, built)
    hasher.close()


@pytest.fixture
async def cost_5_hasher() -> AsyncIterator[BcryptPasswordHasher]:
    """A hasher configured above the cost-4 hashes stored by add_user."""
    hasher = BcryptPasswordHasher(rounds=5, max_threads=1)
    yield hasher
    hasher.close()


class CheckpwSpy:
    """Records the cost of every bcrypt check."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.costs: list[int] = []
        real = bcrypt.checkpw

        def spy(password: bytes, hashed: bytes) -> bool:
            self.costs.append(int(hashed.split(b"$")[2]))
            return real(password, hashed)

        monkeypatch.setattr(bcrypt, "checkpw", spy)


async def test_a_login_returns_a_bearer_token_for_the_user(h: Harness) -> None:
    ann = h.add_user()
    result = await h.auth.login(email="ann@example.com", password=PASSWORD)
    assert (result.token_type, result.expires_in) == ("Bearer", TTL)
    assert result.user == ann
    principal = await h.auth.authenticate(result.access_token)
    assert (principal.kind, principal.subject) == (PrincipalKind.USER, str(ann.id))


async def test_the_email_is_normalised_before_lookup(h: Harness) -> None:
    ann = h.add_user()
    result = await h.auth.login(email="  ANN@Example.com ", password=PASSWORD)
    assert result.user.id == ann.id


async def test_each_login_starts_its_own_time_ordered_session(h: Harness) -> None:
    h.add_user()
    first = await h.auth.login(email="ann@example.com", password=PASSWORD)
    second = await h.auth.login(email="ann@example.com", password=PASSWORD)
    sessions = [(await h.auth.authenticate(r.access_token)).session_id for r in (first, second)]
    assert sessions[0] != sessions[1]
    assert all(uuid.UUID(s).version == 7 for s in sessions)


@pytest.mark.parametrize(
    ("email", "password", "state"),
    [
        ("ann@example.com", "wrong password!", {}),
        ("ghost@example.com", PASSWORD, {}),
        ("not an email", PASSWORD, {}),
        ("ann@example.com", "", {}),
        ("ann@example.com", "x" * 73, {}),
        ("ann@example.com", PASSWORD, {"disabled": True}),
        ("ann@example.com", PASSWORD, {"deleted": True}),
    ],
    ids=[
        "wrong password",
        "unknown email",
        "malformed email",
        "empty password",
        "password over 72 bytes",
        "disabled user",
        "deleted user",
    ],
)
async def test_every_failed_login_gets_one_answer_after_one_bcrypt_check(
    h: Harness,
    monkeypatch: pytest.MonkeyPatch,
    email: str,
    password: str,
    state: dict[str, bool],
) -> None:
    h.add_user(**state)
    await h.hasher.dummy_hash()  # computed at most once per process; not part of a login
    spy = CheckpwSpy(monkeypatch)
    with pytest.raises(InvalidCredentials) as caught:
        await h.auth.login(email=email, password=password)
    assert caught.value.message == "invalid email or password"
    assert spy.costs == [4]


async def test_a_successful_login_also_costs_one_bcrypt_check(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    h.add_user()
    spy = CheckpwSpy(monkeypatch)
    await h.auth.login(email="ann@example.com", password=PASSWORD)
    assert spy.costs == [4]


async def test_a_hash_below_the_configured_cost_is_upgraded_on_login(
    h: Harness, cost_5_hasher: BcryptPasswordHasher
) -> None:
    upgrading = h.with_hasher(cost_5_hasher)
    ann = h.add_user(rounds=4)
    result = await upgrading.login(email="ann@example.com", password=PASSWORD)
    stored = h.db.password_hash(ann.id)
    assert stored.startswith("$2b$05$")
    assert bcrypt.checkpw(PASSWORD.encode(), stored.encode())
    assert result.user == h.db.user(ann.id)


async def test_a_hash_at_the_configured_cost_is_left_alone(h: Harness) -> None:
    ann = h.add_user(rounds=4)
    before = h.db.password_hash(ann.id)
    result = await h.auth.login(email="ann@example.com", password=PASSWORD)
    assert h.db.password_hash(ann.id) == before
    assert result.user.version == ann.version


async def test_an_upgrade_never_overwrites_a_password_changed_meanwhile(
    h: Harness, monkeypatch: pytest.MonkeyPatch, cost_5_hasher: BcryptPasswordHasher
) -> None:
    upgrading = h.with_hasher(cost_5_hasher)
    ann = h.add_user(rounds=4)
    changed = bcrypt.hashpw(b"changed elsewhere", bcrypt.gensalt(4)).decode()
    real_hash = cost_5_hasher.hash

    async def hash_during_a_concurrent_change(password: str) -> str:
        row = h.db.rows[ann.id]
        h.db.rows[ann.id] = type(row)(row.user, changed)
        return await real_hash(password)

    monkeypatch.setattr(cost_5_hasher, "hash", hash_during_a_concurrent_change)
    with pytest.raises(InvalidCredentials):
        await upgrading.login(email="ann@example.com", password=PASSWORD)
    assert h.db.password_hash(ann.id) == changed


async def test_authenticate_refuses_a_bad_token(h: Harness) -> None:
    with pytest.raises(TokenInvalid):
        await h.auth.authenticate("not.a.token")


async def test_the_key_set_is_the_token_services(h: Harness) -> None:
    assert h.auth.jwks_json() == h.tokens.jwks_json()
