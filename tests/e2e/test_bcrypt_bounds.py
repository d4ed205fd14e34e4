"""bcrypt's cost as an attack surface: imports are bounded to costs 04..16, a
login's time does not tell an account with a cheaper stored hash from an
unknown email, logins re-hash any other cost to the configured one, and a
SIGTERM'd server exits within its grace period while bcrypt is busy."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import bcrypt
import grpc
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine
from support.servers import free_port, serve_env, serve_process

from usersvc.services import passwords

from .conftest import ResponseRecorder, RunningServer, running_server
from .helpers import (
    Caller,
    World,
    auth_service_pb2,
    expect_bad_credentials,
    new_email,
    user_service_pb2,
)

CONFIGURED_COST = 10
TIMING_ROUNDS = 11
CHEAP = bcrypt.hashpw(b"the imported passphrase", bcrypt.gensalt(4)).decode()


def with_cost(cost: int) -> str:
    """A well-formed hash of ``cost`` without paying for it: a check against
    it still runs the full cost (and never matches)."""
    return f"{CHEAP[:4]}{cost:02d}{CHEAP[6:]}"


async def _stream(messages: Iterable[Any]) -> AsyncIterator[Any]:
    for message in messages:
        yield message


async def import_rows(
    caller: Caller, rows: list[tuple[str, str]]
) -> user_service_pb2.ImportUsersResponse:
    request = user_service_pb2.ImportUsersRequest(
        users=[user_service_pb2.ImportedUser(email=e, password_hash=h) for e, h in rows]
    )
    response: user_service_pb2.ImportUsersResponse = await caller.users.ImportUsers(
        _stream([request])
    )
    return response


@pytest.fixture
async def costly(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    """A server hashing at cost 10 (the other e2e servers: 4), on the same
    database and key."""
    settings = dataclasses.replace(e2e_settings, bcrypt_rounds=CONFIGURED_COST)
    async with running_server(settings, recorder) as running:
        yield running


async def test_an_import_row_of_cost_17_or_31_is_refused_and_the_others_imported(
    world: World,
) -> None:
    rows = [
        (new_email("cost31"), with_cost(31)),
        (new_email("cost16"), with_cost(16)),
        (new_email("cost17"), with_cost(17)),
    ]

    response = await import_rows(world.admin, rows)

    assert (response.imported_count, response.failed_count) == (1, 2)
    assert [(e.row, e.field, e.reason) for e in response.errors] == [
        (0, "password_hash", "INVALID_PASSWORD_HASH"),
        (2, "password_hash", "INVALID_PASSWORD_HASH"),
    ]
    assert "04..16" in response.errors[0].description


async def stored_cost(server: RunningServer, email: str) -> int:
    async with server.container.engine.connect() as connection:
        stored = (
            await connection.execute(
                text("SELECT password_hash FROM users WHERE lower(email) = :email"),
                {"email": email},
            )
        ).scalar_one()
    cost = passwords.cost_of(stored)
    assert cost is not None
    return cost


@pytest.mark.parametrize("imported_cost", [4, CONFIGURED_COST + 1])
async def test_a_login_re_hashes_a_stored_hash_of_another_cost_at_the_configured_one(
    world: World, costly: RunningServer, imported_cost: int
) -> None:
    password = "an imported passphrase"
    email = new_email(f"cost{imported_cost}")
    stored = bcrypt.hashpw(password.encode(), bcrypt.gensalt(imported_cost)).decode()
    admin = Caller(costly.channel, world.admin.token)
    assert (await import_rows(admin, [(email, stored)])).imported_count == 1

    await Caller(costly.channel, None).auth.Login(
        auth_service_pb2.LoginRequest(email=email, password=password)
    )

    assert await stored_cost(costly, email) == CONFIGURED_COST
    # The new hash is of the same password.
    await Caller(costly.channel, None).auth.Login(
        auth_service_pb2.LoginRequest(email=email, password=password)
    )


async def test_a_wrong_password_for_a_cheap_imported_hash_costs_what_an_unknown_email_costs(
    world: World,
    costly: RunningServer,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, object], None],
) -> None:
    cheap_email = new_email("cheap")
    admin = Caller(costly.channel, world.admin.token)
    assert (await import_rows(admin, [(cheap_email, CHEAP)])).imported_count == 1
    anonymous = Caller(costly.channel, None)
    # Which costs each login's bcrypt checks ran at (the server is in this
    # process, its bcrypt threads too).
    costs: list[int] = []
    real_check = passwords._checkpw

    def recording_check(secret: bytes, hashed: bytes) -> bool:
        costs.append(int(hashed[4:6]))
        return real_check(secret, hashed)

    monkeypatch.setattr(passwords, "_checkpw", recording_check)

    async def timed_failure(email: str) -> tuple[float, list[int]]:
        del costs[:]
        started = time.perf_counter()
        request = auth_service_pb2.LoginRequest(email=email, password="wrong guess!")
        await expect_bad_credentials(anonymous.auth.Login(request))
        return time.perf_counter() - started, sorted(costs)

    cheap_times: list[float] = []
    unknown_times: list[float] = []
    for round_ in range(TIMING_ROUNDS):
        # The lockout must not decide the path: a fresh count every round.
        async with costly.container.engine.begin() as connection:
            await connection.execute(
                text(
                    "UPDATE users SET failed_login_count = 0, locked_until = NULL "
                    "WHERE lower(email) = :email"
                ),
                {"email": cheap_email},
            )
        cheap_time, cheap_costs = await timed_failure(cheap_email)
        unknown_time, unknown_costs = await timed_failure(new_email(f"nobody{round_}"))
        assert unknown_costs == [CONFIGURED_COST]
        assert CONFIGURED_COST in cheap_costs, cheap_costs
        cheap_times.append(cheap_time)
        unknown_times.append(unknown_time)

    ratio = statistics.median(cheap_times) / statistics.median(unknown_times)
    summary = (
        f"failed login, cost-4 imported account vs unknown email at cost {CONFIGURED_COST}: "
        f"median {statistics.median(cheap_times) * 1000:.1f} ms vs "
        f"{statistics.median(unknown_times) * 1000:.1f} ms, ratio {ratio:.2f} "
        f"over {TIMING_ROUNDS} rounds"
    )
    print(summary)
    record_property("cheap_hash_vs_unknown_email_median_ratio", round(ratio, 3))


# Slow: a cost-16 hash keeps a core busy for seconds, and a server process
# starts and stops.
@pytest.mark.slow
async def test_sigterm_ends_the_server_within_its_grace_while_bcrypt_is_busy(
    world: World, database_url: str, tmp_path: Path, e2e_settings: Any
) -> None:
    # A cost-16 check takes seconds of one core (half a minute on a busy
    # machine); the server must not wait for it when told to stop.
    email = new_email("cost16")
    assert (await import_rows(world.admin, [(email, with_cost(16))])).imported_count == 1
    grace = 1.0
    env = serve_env(
        database_url,
        tmp_path,
        USERSVC_LISTEN_ADDR=f"127.0.0.1:{free_port()}",
        USERSVC_JWT_PRIVATE_KEY_PEM=e2e_settings.jwt_private_key_pem,
        USERSVC_SHUTDOWN_GRACE_SECONDS=str(grace),
        USERSVC_BCRYPT_MAX_THREADS="1",
    )
    engine = create_async_engine(database_url)
    try:
        async with serve_process(env, tmp_path / "serve.log", stop="sigterm") as served:
            channel = grpc.aio.insecure_channel(served.address)
            login = asyncio.ensure_future(
                Caller(channel, None).auth.Login(
                    auth_service_pb2.LoginRequest(email=email, password="wrong guess!"),
                    timeout=120,
                )
            )
            # The attempt is counted (and committed) just before bcrypt starts.
            while True:
                async with engine.connect() as connection:
                    count = (
                        await connection.execute(
                            text("SELECT failed_login_count FROM users WHERE email = :e"),
                            {"e": email},
                        )
                    ).scalar_one()
                if count:
                    break
                await asyncio.sleep(0.01)
            started = time.perf_counter()
            code = await served.terminate(30)
            exited_after = time.perf_counter() - started
            login.cancel()
            await asyncio.gather(login, return_exceptions=True)
            await channel.close()
    finally:
        await engine.dispose()
    print(f"exit {exited_after:.2f} s after SIGTERM with a cost-16 check running")
    assert code == 0, served.log_text()
    assert exited_after < grace + 2.0
