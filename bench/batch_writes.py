"""BatchUpdateUsers against single UpdateUser calls: the ``batch-writes``
scenario of ``make bench`` (``make bench SCENARIOS=batch-writes``).

N users (1000 by default) are renamed three ways each round, in an order the
harness rotates: by one BatchUpdateUsers call (1000 items per call), by N
UpdateUser calls one after another, and by N UpdateUser calls with 32 in
flight. Every run is checked afterwards (BatchGetUsers, not timed): each user
must carry that run's name. The users are inserted once, straight into the
bench database (their passwords are never used), and deleted at the end.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import Awaitable, Callable

import asyncpg
import grpc
from google.protobuf import field_mask_pb2

from usersvc_protos.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from .baselines.bare import connect_kwargs
from .calls import bearer
from .results import RatioSpec, Target
from .scenarios import Context, DriverRun, Plan
from .seed import delete_users

BATCH_WRITES_DOMAIN = "batch-writes.bench"
BATCH_WRITES_TARGET = Target(">=", 10.0)
IN_FLIGHT = 32
MAX_BATCH = 1000
CALL_TIMEOUT_SECONDS = 120.0
NAME_MASK = field_mask_pb2.FieldMask(paths=["display_name"])
# A bcrypt-shaped hash nobody logs in with.
UNUSED_HASH = "$2b$04$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"

_INSERT = """
INSERT INTO users (id, email, password_hash, display_name, roles, create_time, update_time)
SELECT gen_random_uuid(), 'w' || n || '-' || $2 || '@batch-writes.bench', $3,
       'Batch write ' || n, ARRAY['user'], now(), now()
FROM generate_series(1, $1::bigint) AS n
RETURNING id
"""


def rename(user_id: str, name: str) -> user_service_pb2.UpdateUserRequest:
    return user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=user_id, display_name=name), update_mask=NAME_MASK
    )


async def _insert_users(url: str, count: int) -> list[str]:
    connection = await asyncpg.connect(**connect_kwargs(url))
    try:
        rows = await connection.fetch(_INSERT, count, secrets.token_hex(3), UNUSED_HASH)
    finally:
        await connection.close()
    return [str(row["id"]) for row in rows]


async def batch_writes_plan(ctx: Context) -> Plan:
    system = ctx.usersvc
    meta = bearer(ctx.admin_token)
    ids = await _insert_users(ctx.database_url, ctx.batch_writes_users)
    serial = itertools.count()

    async def check(stub: user_service_pb2_grpc.UserServiceStub, tag: str, way: str) -> None:
        for start in range(0, len(ids), MAX_BATCH):
            answer = await stub.BatchGetUsers(
                user_service_pb2.BatchGetUsersRequest(ids=ids[start : start + MAX_BATCH]),
                metadata=meta,
                timeout=CALL_TIMEOUT_SECONDS,
            )
            if any(not user.display_name.startswith(tag + " ") for user in answer.users):
                raise AssertionError(f"{way} did not write every user")

    def driver(
        way: str, work: Callable[[user_service_pb2_grpc.UserServiceStub, str], Awaitable[None]]
    ) -> Callable[[float], Awaitable[tuple[int, float]]]:
        async def drive(seconds: float) -> tuple[int, float]:
            del seconds  # a run renames a fixed number of users
            tag = f"r{next(serial)}-{way}"
            async with grpc.aio.insecure_channel(system.address) as channel:
                stub = user_service_pb2_grpc.UserServiceStub(channel)
                began = time.perf_counter()
                await work(stub, tag)
                elapsed = time.perf_counter() - began
                await check(stub, tag, way)
            return len(ids), elapsed

        return drive

    async def batch(stub: user_service_pb2_grpc.UserServiceStub, tag: str) -> None:
        requests = [rename(i, f"{tag} {n}") for n, i in enumerate(ids)]
        for start in range(0, len(requests), MAX_BATCH):
            await stub.BatchUpdateUsers(
                user_service_pb2.BatchUpdateUsersRequest(
                    requests=requests[start : start + MAX_BATCH]
                ),
                metadata=meta,
                timeout=CALL_TIMEOUT_SECONDS,
            )

    async def sequential(stub: user_service_pb2_grpc.UserServiceStub, tag: str) -> None:
        for n, i in enumerate(ids):
            await stub.UpdateUser(rename(i, f"{tag} {n}"), metadata=meta, timeout=30)

    async def concurrent(stub: user_service_pb2_grpc.UserServiceStub, tag: str) -> None:
        gate = asyncio.Semaphore(IN_FLIGHT)

        async def one(n: int, user_id: str) -> None:
            async with gate:
                await stub.UpdateUser(rename(user_id, f"{tag} {n}"), metadata=meta, timeout=30)

        await asyncio.gather(*(one(n, i) for n, i in enumerate(ids)))

    count = len(ids)
    plan = Plan(
        "batch-writes",
        f"{count:,} users renamed by BatchUpdateUsers ({MAX_BATCH} items per call) vs "
        f"{count:,} UpdateUser calls (Python grpc.aio client)",
    )
    plan.runs = [
        DriverRun("one batch", system, driver("batch", batch), "users"),
        DriverRun("single calls, sequential", system, driver("sequential", sequential), "users"),
        DriverRun(
            f"single calls, {IN_FLIGHT} in flight",
            system,
            driver("concurrent", concurrent),
            "users",
        ),
    ]
    plan.ratios = [
        RatioSpec(
            "batch vs sequential UpdateUser (x faster)",
            ("one batch", "rps"),
            ("single calls, sequential", "rps"),
            BATCH_WRITES_TARGET,
        ),
        RatioSpec(
            f"batch vs UpdateUser, {IN_FLIGHT} in flight (x faster)",
            ("one batch", "rps"),
            (f"single calls, {IN_FLIGHT} in flight", "rps"),
        ),
    ]
    plan.notes.append(
        "req/s are users renamed per second; every run is checked afterwards with "
        "BatchGetUsers (not timed)"
    )

    async def teardown() -> None:
        await delete_users(ctx.database_url, BATCH_WRITES_DOMAIN)

    plan.teardown = teardown
    return plan
