"""Races over real gRPC against the real PostgreSQL: many callers doing the
same thing at the same moment get exactly one success and clean refusals
for the rest, never INTERNAL, and the database holds exactly one result.

The server of this tier has a pool of 20 + 20 connections and waits up to
60 s for one (support.py / conftest.py), so a thousand calls queue for
connections instead of failing with DATABASE_UNAVAILABLE; rate limits are
out of reach there.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter

import grpc
import pytest
from e2e.helpers import bearer, new_email
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc_protos.v1 import auth_service_pb2, user_pb2, user_service_pb2

from .rpcs import RPCS, Outcome, call_raw, well_formed_problems
from .support import Cast, assert_consistent

RPC = {rpc.name: rpc for rpc in RPCS}
# Only a hung server reaches it.
RACE_DEADLINE_SECONDS = 120.0


def mixed_case(email: str, n: int) -> str:
    """The n-th spelling of ``email`` that differs only in case (n < 1024
    needs ten letters at the start)."""
    return "".join(c.upper() if i < 10 and (n >> i) & 1 else c for i, c in enumerate(email))


def tally(outcomes: list[Outcome]) -> Counter[tuple[str, str | None]]:
    return Counter((o.code.name, o.reason) for o in outcomes)


def assert_all_well_formed(outcomes: list[Outcome]) -> None:
    problems = [p for o in outcomes for p in well_formed_problems(o)]
    assert not problems, problems[:5]


async def count_rows(engine: AsyncEngine, query: str, **params: object) -> int:
    async with engine.connect() as connection:
        return int((await connection.execute(text(query), params)).scalar_one())


# Slow (a thousand calls at once through one server: 20 s on a loaded
# machine); tests/integration/test_concurrency.py races fifty creates of one
# email in every run.
@pytest.mark.slow
async def test_a_thousand_concurrent_creates_of_one_email_leave_exactly_one_user(
    cast: Cast, engine: AsyncEngine
) -> None:
    email = f"abcdefghij-{secrets.token_hex(4)}@example.com"
    spellings = [mixed_case(email, n) for n in range(1000)]
    assert len(set(spellings)) == 1000
    password = cast.password()
    bodies = [
        user_service_pb2.CreateUserRequest(email=spelling, password=password).SerializeToString()
        for spelling in spellings
    ]

    started = time.monotonic()
    outcomes = await asyncio.gather(
        *(
            call_raw(cast.channel, RPC["CreateUser"], body, deadline_seconds=RACE_DEADLINE_SECONDS)
            for body in bodies
        )
    )
    elapsed = time.monotonic() - started

    assert_all_well_formed(outcomes)
    assert tally(outcomes) == {
        ("OK", None): 1,
        ("ALREADY_EXISTS", "EMAIL_ALREADY_EXISTS"): 999,
    }, f"after {elapsed:.1f}s"
    rows = await count_rows(
        engine, "SELECT count(*) FROM users WHERE lower(email) = :email", email=email
    )
    stored = await count_rows(
        engine, "SELECT count(*) FROM users WHERE email = :email", email=email
    )
    assert (rows, stored) == (1, 1)


async def test_a_hundred_concurrent_updates_with_one_etag_let_exactly_one_win(
    cast: Cast, engine: AsyncEngine
) -> None:
    user_id, _, _ = await cast.world.seed_user(display_name="before")
    current = await cast.admin.users.GetUser(user_service_pb2.GetUserRequest(id=user_id))
    version_before = await count_rows(
        engine, "SELECT version FROM users WHERE id = CAST(:id AS uuid)", id=user_id
    )
    bodies = [
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user_id, display_name=f"racer {i}", etag=current.user.etag),
            update_mask={"paths": ["display_name"]},
        ).SerializeToString()
        for i in range(100)
    ]
    admin = bearer(cast.admin.login.access_token)

    outcomes = await asyncio.gather(
        *(
            call_raw(
                cast.channel,
                RPC["UpdateUser"],
                body,
                metadata=admin,
                deadline_seconds=RACE_DEADLINE_SECONDS,
            )
            for body in bodies
        )
    )

    assert_all_well_formed(outcomes)
    assert tally(outcomes) == {("OK", None): 1, ("ABORTED", "ETAG_MISMATCH"): 99}
    winner = next(o for o in outcomes if o.ok)
    assert winner.response is not None
    won = user_service_pb2.UpdateUserResponse.FromString(winner.response).user
    after = await cast.admin.users.GetUser(user_service_pb2.GetUserRequest(id=user_id))
    assert after.user.display_name == won.display_name
    assert after.user.etag == won.etag != current.user.etag
    version_after = await count_rows(
        engine, "SELECT version FROM users WHERE id = CAST(:id AS uuid)", id=user_id
    )
    assert version_after == version_before + 1


@pytest.mark.parametrize("racers", [2, 50])
async def test_concurrent_refreshes_of_one_refresh_token_yield_exactly_one_new_pair(
    cast: Cast, racers: int
) -> None:
    """Exactly one caller gets a new pair. (The others count as a replay of
    a retired token, which, by design, also revokes the session: the test
    does not depend on that.)"""
    account = await cast.new_account("refresher")
    body = auth_service_pb2.RefreshTokenRequest(
        refresh_token=account.login.refresh_token
    ).SerializeToString()

    outcomes = await asyncio.gather(
        *(
            call_raw(
                cast.channel, RPC["RefreshToken"], body, deadline_seconds=RACE_DEADLINE_SECONDS
            )
            for _ in range(racers)
        )
    )

    assert_all_well_formed(outcomes)
    assert tally(outcomes) == {
        ("OK", None): 1,
        ("UNAUTHENTICATED", "REFRESH_TOKEN_INVALID"): racers - 1,
    }
    winner = next(o for o in outcomes if o.ok)
    assert winner.response is not None
    pair = auth_service_pb2.RefreshTokenResponse.FromString(winner.response)
    assert pair.access_token
    assert pair.refresh_token not in ("", account.login.refresh_token)


async def test_concurrent_creates_with_one_request_id_all_return_the_one_user(
    cast: Cast, engine: AsyncEngine
) -> None:
    email = new_email("idem")
    body = user_service_pb2.CreateUserRequest(
        email=email, password=cast.password(), request_id=f"race-{secrets.token_hex(4)}"
    ).SerializeToString()
    admin = bearer(cast.admin.login.access_token)

    outcomes = await asyncio.gather(
        *(
            call_raw(
                cast.channel,
                RPC["CreateUser"],
                body,
                metadata=admin,
                deadline_seconds=RACE_DEADLINE_SECONDS,
            )
            for _ in range(50)
        )
    )

    assert_all_well_formed(outcomes)
    assert tally(outcomes) == {("OK", None): 50}
    ids = {
        user_service_pb2.CreateUserResponse.FromString(o.response).user.id
        for o in outcomes
        if o.response is not None
    }
    assert len(ids) == 1
    assert await count_rows(engine, "SELECT count(*) FROM users WHERE email = :e", e=email) == 1


async def test_concurrent_batches_sharing_one_email_commit_exactly_one_batch_whole(
    cast: Cast, engine: AsyncEngine
) -> None:
    shared = new_email("shared")
    tag = secrets.token_hex(4)
    bodies = [
        user_service_pb2.BatchCreateUsersRequest(
            requests=[
                user_service_pb2.CreateUserRequest(
                    email=f"own-{i}-{tag}@example.com", password=cast.password()
                ),
                user_service_pb2.CreateUserRequest(email=shared, password=cast.password()),
            ]
        ).SerializeToString()
        for i in range(30)
    ]
    admin = bearer(cast.admin.login.access_token)

    outcomes = await asyncio.gather(
        *(
            call_raw(
                cast.channel,
                RPC["BatchCreateUsers"],
                body,
                metadata=admin,
                deadline_seconds=RACE_DEADLINE_SECONDS,
            )
            for body in bodies
        )
    )

    assert_all_well_formed(outcomes)
    assert tally(outcomes) == {("OK", None): 1, ("ALREADY_EXISTS", "EMAIL_ALREADY_EXISTS"): 29}
    winner = next(i for i, o in enumerate(outcomes) if o.ok)
    own = await count_rows(
        engine, "SELECT count(*) FROM users WHERE email LIKE :pattern", pattern=f"own-%-{tag}@%"
    )
    assert own == 1, "a losing batch left part of itself behind"
    assert (
        await count_rows(
            engine,
            "SELECT count(*) FROM users WHERE email = :e",
            e=f"own-{winner}-{tag}@example.com",
        )
        == 1
    )


async def test_logins_racing_a_disable_leave_no_live_session(
    cast: Cast, engine: AsyncEngine
) -> None:
    user_id, email, password = await cast.world.seed_user()
    login = auth_service_pb2.LoginRequest(email=email, password=password).SerializeToString()
    disable = user_service_pb2.DisableUserRequest(id=user_id).SerializeToString()
    admin = bearer(cast.admin.login.access_token)

    calls = [
        call_raw(cast.channel, RPC["Login"], login, deadline_seconds=RACE_DEADLINE_SECONDS)
        for _ in range(40)
    ]
    calls.insert(
        20,
        call_raw(
            cast.channel,
            RPC["DisableUser"],
            disable,
            metadata=admin,
            deadline_seconds=RACE_DEADLINE_SECONDS,
        ),
    )
    outcomes = await asyncio.gather(*calls)

    assert_all_well_formed(outcomes)
    assert outcomes[20].ok, outcomes[20].describe()
    assert {o.code for o in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED}
    live = await count_rows(
        engine,
        "SELECT count(*) FROM sessions WHERE user_id = CAST(:id AS uuid) AND revoke_time IS NULL",
        id=user_id,
    )
    assert live == 0
    await assert_consistent(engine)
