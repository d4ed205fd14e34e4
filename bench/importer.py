"""ImportUsers throughput: users per second through the client-streaming
RPC, from a Python grpc.aio client.

Each round imports a fixed number of users over ``import_streams``
concurrent streams of ``import_batch`` users per message and is timed from
the first message to the last response. The messages are built and
serialized before the clock starts (the hashes are a few precomputed bcrypt
strings; the server validates their form and stores them, never re-hashes),
so the figure is the server's and the database's, not the client's protobuf
encoding.
"""

from __future__ import annotations

import asyncio
import itertools
import secrets
import time
from collections.abc import AsyncIterator

import bcrypt
import grpc

from usersvc_protos.v1 import user_service_pb2

from .calls import USER_SERVICE, bearer
from .results import AbsoluteSpec
from .scenarios import IMPORT_METHOD, IMPORT_TARGET, Context, DriverRun, Plan
from .seed import delete_users
from .systems import USERSVC

IMPORT_DOMAIN = "import.bench"
DISTINCT_HASHES = 8


def _hashes() -> list[str]:
    # Cost 10: what a system being migrated away from might have used. The
    # cost does not matter to the import, which never verifies a hash.
    return [
        bcrypt.hashpw(secrets.token_bytes(12), bcrypt.gensalt(10)).decode()
        for _ in range(DISTINCT_HASHES)
    ]


def _messages(count: int, batch: int, *, tag: str, hashes: list[str]) -> list[bytes]:
    serial = itertools.count()
    messages = []
    for start in range(0, count, batch):
        users = [
            user_service_pb2.ImportedUser(
                email=f"i{tag}-{n}@{IMPORT_DOMAIN}",
                password_hash=hashes[n % len(hashes)],
                display_name=f"Imported {n}",
            )
            for n in itertools.islice(serial, min(batch, count - start))
        ]
        messages.append(user_service_pb2.ImportUsersRequest(users=users).SerializeToString())
    return messages


async def _stream(messages: list[bytes]) -> AsyncIterator[bytes]:
    for message in messages:
        yield message


async def _import(
    channel: grpc.aio.Channel, token: str, messages: list[bytes]
) -> user_service_pb2.ImportUsersResponse:
    method = channel.stream_unary(
        USER_SERVICE + IMPORT_METHOD,
        request_serializer=lambda body: body,
        response_deserializer=user_service_pb2.ImportUsersResponse.FromString,
    )
    response: user_service_pb2.ImportUsersResponse = await method(
        _stream(messages), metadata=bearer(token), timeout=600
    )
    return response


async def import_plan(ctx: Context, plan: Plan) -> Plan:
    """The import scenario on the main usersvc. Raises AssertionError when
    a trial import of two users does not import both; grpc errors."""
    system = ctx.usersvc
    hashes = await asyncio.to_thread(_hashes)
    per_round = ctx.import_users
    streams = ctx.import_streams

    async with grpc.aio.insecure_channel(system.address) as channel:
        trial = await _import(
            channel,
            ctx.admin_token,
            _messages(2, 2, tag=secrets.token_hex(4), hashes=hashes),
        )
    if trial.imported_count != 2 or trial.failed_count != 0:
        raise AssertionError(f"a trial import of 2 users answered {trial}")
    print("  verified a trial import of 2 users: imported 2, failed 0", flush=True)

    async def drive(seconds: float) -> tuple[int, float]:
        del seconds  # a round imports a fixed number of users instead
        tag = secrets.token_hex(4)
        share = per_round // streams
        bodies = [
            await asyncio.to_thread(
                _messages, share, ctx.import_batch, tag=f"{tag}s{index}", hashes=hashes
            )
            for index in range(streams)
        ]
        async with grpc.aio.insecure_channel(system.address) as channel:
            began = time.perf_counter()
            answers = await asyncio.gather(
                *(_import(channel, ctx.admin_token, messages) for messages in bodies)
            )
            elapsed = time.perf_counter() - began
        imported = sum(answer.imported_count for answer in answers)
        failed = sum(answer.failed_count for answer in answers)
        if failed or imported != share * streams:
            raise AssertionError(
                f"ImportUsers imported {imported} of {share * streams} users, {failed} failed"
            )
        return imported, elapsed

    plan.title = (
        f"ImportUsers: {per_round:,} users per round over {streams} concurrent streams, "
        f"{ctx.import_batch} users per message (Python grpc.aio client)"
    )
    plan.runs = [DriverRun(USERSVC, system, drive, "users")]
    plan.absolutes = [AbsoluteSpec("users/s imported", USERSVC, "rps", IMPORT_TARGET, "users/s")]
    plan.notes.append("a trial import of 2 users was checked first: imported 2, failed 0")

    async def teardown() -> None:
        await delete_users(ctx.database_url, IMPORT_DOMAIN)

    plan.teardown = teardown
    return plan
