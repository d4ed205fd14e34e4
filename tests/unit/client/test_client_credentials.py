"""PasswordLogin: when it logs in, when it refreshes, that concurrent
callers share one refresh, and how it recovers from a refused refresh
token. Time is a fake clock; the token endpoint is a fake."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import pytest

from usersvc.client import (
    InvalidCredentials,
    IssuedTokens,
    PasswordLogin,
    RefreshTokenInvalid,
    StaticToken,
    TlsConfig,
)

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeEndpoint:
    """Issues numbered tokens and records every call; ``gate`` (when set)
    holds refreshes until released, so a test can pile callers up."""

    def __init__(self, *, expires_in: int = 900) -> None:
        self.expires_in = expires_in
        self.calls: list[str] = []
        self.retired: set[str] = set()
        self.refuse_refresh = False
        self.gate: asyncio.Event | None = None
        self._serial = itertools.count(1)

    def _issue(self) -> IssuedTokens:
        n = next(self._serial)
        return IssuedTokens(f"access-{n}", f"refresh-{n}", self.expires_in)

    async def login_tokens(self, email: str, password: str) -> IssuedTokens:
        self.calls.append("login")
        if password != "right":
            raise InvalidCredentials(UNAUTHENTICATED, "invalid email or password")
        return self._issue()

    async def refresh_tokens(self, refresh_token: str) -> IssuedTokens:
        self.calls.append(f"refresh:{refresh_token}")
        if self.gate is not None:
            await self.gate.wait()
        if self.refuse_refresh or refresh_token in self.retired:
            raise RefreshTokenInvalid(UNAUTHENTICATED, "refresh token invalid")
        self.retired.add(refresh_token)
        return self._issue()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def endpoint() -> FakeEndpoint:
    return FakeEndpoint()


@pytest.fixture
def credential(clock: FakeClock) -> PasswordLogin:
    return PasswordLogin("ada@example.com", "right", clock=clock)


async def test_the_first_call_logs_in_and_later_calls_reuse_the_token(
    credential: PasswordLogin, endpoint: FakeEndpoint
) -> None:
    first = await credential.access_token(endpoint)
    second = await credential.access_token(endpoint)
    assert first == second == "access-1"
    assert endpoint.calls == ["login"]
    assert credential.refresh_token == "refresh-1"


async def test_the_token_is_refreshed_30_seconds_before_it_expires(
    credential: PasswordLogin, endpoint: FakeEndpoint, clock: FakeClock
) -> None:
    await credential.access_token(endpoint)
    clock.now += 900 - 30 - 0.001
    assert await credential.access_token(endpoint) == "access-1"
    clock.now += 0.001
    assert await credential.access_token(endpoint) == "access-2"
    assert endpoint.calls == ["login", "refresh:refresh-1"]


async def test_a_short_lived_token_is_refreshed_at_four_fifths_of_its_life(
    clock: FakeClock,
) -> None:
    endpoint = FakeEndpoint(expires_in=30)
    credential = PasswordLogin("ada@example.com", "right", clock=clock)
    await credential.access_token(endpoint)
    clock.now += 23.9
    assert await credential.access_token(endpoint) == "access-1"
    clock.now += 0.1
    assert await credential.access_token(endpoint) == "access-2"


async def test_concurrent_callers_share_one_refresh(
    credential: PasswordLogin, endpoint: FakeEndpoint, clock: FakeClock
) -> None:
    await credential.access_token(endpoint)
    clock.now += 900
    endpoint.gate = asyncio.Event()
    waiting = [asyncio.create_task(credential.access_token(endpoint)) for _ in range(20)]
    # Let every task reach the refresh (or the lock in front of it).
    for _ in range(5):
        await asyncio.sleep(0)
    endpoint.gate.set()
    tokens = await asyncio.gather(*waiting)
    assert set(tokens) == {"access-2"}
    assert endpoint.calls == ["login", "refresh:refresh-1"]


async def test_a_refused_refresh_token_leads_to_a_new_login(
    credential: PasswordLogin, endpoint: FakeEndpoint, clock: FakeClock
) -> None:
    await credential.access_token(endpoint)
    endpoint.refuse_refresh = True
    clock.now += 900
    assert await credential.access_token(endpoint) == "access-2"
    assert endpoint.calls == ["login", "refresh:refresh-1", "login"]


async def test_wrong_credentials_raise_and_are_not_retried(
    clock: FakeClock, endpoint: FakeEndpoint
) -> None:
    credential = PasswordLogin("ada@example.com", "wrong", clock=clock)
    with pytest.raises(InvalidCredentials):
        await credential.access_token(endpoint)
    assert endpoint.calls == ["login"]


async def test_a_rejected_token_is_renewed_at_once_whatever_the_clock_says(
    credential: PasswordLogin, endpoint: FakeEndpoint
) -> None:
    token = await credential.access_token(endpoint)
    assert credential.reject(token) is True
    assert await credential.access_token(endpoint) == "access-2"
    # A stale rejection (of a token already replaced) changes nothing more.
    assert credential.reject(token) is True
    assert await credential.access_token(endpoint) == "access-2"
    assert endpoint.calls == ["login", "refresh:refresh-1"]


async def test_forgetting_the_tokens_means_logging_in_again(
    credential: PasswordLogin, endpoint: FakeEndpoint
) -> None:
    await credential.access_token(endpoint)
    credential.forget()
    assert credential.refresh_token is None
    assert await credential.access_token(endpoint) == "access-2"
    assert endpoint.calls == ["login", "login"]


async def test_a_static_token_is_sent_as_is_and_never_renewed(endpoint: FakeEndpoint) -> None:
    credential = StaticToken("given")
    assert await credential.access_token(endpoint) == "given"
    assert credential.reject("given") is False
    assert endpoint.calls == []


def test_a_client_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(ValueError, match="private key"):
        TlsConfig(root_certificates=b"ca", certificate_chain=b"cert")
