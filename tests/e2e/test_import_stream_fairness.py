"""A long ImportUsers stream shares the server: while an admin streams
100,000 users (or 1,000 with the largest labels) into a real ``usersvc
serve`` process, the server's event loop is never held for long (its own lag
monitor says how long it was: usersvc_event_loop_hold_seconds on /metrics),
GetUser and Health from another connection keep answering, and health stays
SERVING. Rows that arrive together (a full message) were validated without
a pause, and 21 MB of labels went to the driver in one statement, each
holding the server's event loop for tens of milliseconds; the importer now
yields every few milliseconds (usersvc.services.bulk_import.ROWS_PER_YIELD)
and writes at most about 1 MiB per statement (DEFAULT_BATCH_CHARACTERS),
both tested deterministically in tests/unit/test_user_service_import.py.

The probe runs in a process of its own; the figures are printed (pytest -s)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import grpc
import pytest
from grpc_health.v1 import health_pb2

from .helpers import (
    Caller,
    World,
    auth_service_pb2,
    bearer,
    user_service_pb2,
    user_service_pb2_grpc,
)
from .served import LoopFigures, scrape, served, server_env
from .test_process import free_port

# (messages, users per message, labels per user): 100,000 users as many small
# messages as a client may send, or as few full ones (10,000 users each, the
# most a message may hold: they arrive at once and were validated without
# a pause); or 1,000 users with the largest labels, 40 to a 1 MiB message
# (21 MB in all, which went to the database in one statement).
SHAPES = [(100_000, 1, 0), (10, 10_000, 0), (25, 40, 64)]
SHAPE_IDS = ["100k-messages", "full-messages", "labelled-messages"]
# The server's event loop, as its lag monitor measured it: the longest a
# step may hold it. The hold is CPU time of the loop's thread, so a process
# waiting for a CPU on a machine shared with other work is not counted (the
# lag, which counts that wait too, is printed). The goal is ~10 ms; the
# monitor may add up to its 10 ms interval. Before the importer yielded, a
# full message was validated in stretches of up to 2,000 rows (a batch)
# without a pause, or all 10,000 when the database was quick: 40 stretches
# of 25-50 ms here, with lags of up to 1.3 s on a busy machine.
MAX_HOLD_SECONDS = 0.025
# Generous bounds for a machine shared with other work. Health/Check
# touches no database, so its latency is the server's event loop alone: a
# loop that yields answers it in milliseconds. GetUser also waits for
# PostgreSQL, which other work on the machine can stall now and then, so
# its bound is on the 99th percentile.
MAX_HEALTH_SECONDS = 1.0
MAX_GET_USER_P99_SECONDS = 1.0
HASH = bcrypt.hashpw(b"Imported-fairness-password!", bcrypt.gensalt(4)).decode()


# Runs in a process of its own, so that neither the test's event loop (busy
# writing the stream) nor its GIL delays the probe: GetUser(me) and
# Health/Check back to back until stdin closes, then the figures as JSON.
PROBE = """
import json, sys, threading, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from usersvc_protos.v1 import user_service_pb2, user_service_pb2_grpc

address, token = sys.argv[1], sys.argv[2]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
get_user, checks_taken, health, failures = [], [], [], []
with grpc.insecure_channel(address) as channel:
    users = user_service_pb2_grpc.UserServiceStub(channel)
    checks = health_pb2_grpc.HealthStub(channel)
    request = user_service_pb2.GetUserRequest(id="me")
    print("ready", flush=True)
    while not stop.is_set():
        started = time.perf_counter()
        try:
            users.GetUser(request, metadata=(("authorization", "Bearer " + token),), timeout=30)
            middle = time.perf_counter()
            status = checks.Check(health_pb2.HealthCheckRequest(), timeout=30).status
        except grpc.RpcError as exc:
            failures.append(f"{exc.code()}: {exc.details()}")
            continue
        get_user.append(middle - started)
        checks_taken.append(time.perf_counter() - middle)
        health.append(status)
figures = {"get_user": get_user, "checks": checks_taken, "health": health, "failures": failures}
print(json.dumps(figures), flush=True)
"""


@dataclass
class Probe:
    get_user: list[float]
    checks: list[float]
    health: list[int]
    failures: list[str]


@asynccontextmanager
async def probing(address: str, token: str) -> AsyncIterator[list[Probe]]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        PROBE,
        address,
        token,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    result: list[Probe] = []
    try:
        assert await asyncio.wait_for(process.stdout.readline(), 60) == b"ready\n"
        yield result
    finally:
        process.stdin.close()
        out, _ = await asyncio.wait_for(process.communicate(), 60)
    result.append(Probe(**json.loads(out)))


def maximal_labels(count: int, seed: str) -> dict[str, str]:
    """``count`` labels of 63-character keys and 256-character values."""
    return {
        f"k{n:02d}{seed}".ljust(63, "x"): f"{seed}{n:02d}".ljust(256, "v") for n in range(count)
    }


async def messages(
    domain: str, count: int, per_message: int, labels: int
) -> AsyncIterator[user_service_pb2.ImportUsersRequest]:
    for index in range(count):
        yield user_service_pb2.ImportUsersRequest(
            users=[
                user_service_pb2.ImportedUser(
                    email=f"i{index:06d}-{row:05d}@{domain}",
                    password_hash=HASH,
                    labels=maximal_labels(labels, f"{index:06d}{row:05d}"),
                )
                for row in range(per_message)
            ]
        )


@pytest.mark.slow
@pytest.mark.parametrize(("count", "per_message", "labels"), SHAPES, ids=SHAPE_IDS)
async def test_a_long_import_leaves_get_user_and_health_answering(
    world: World, database_url: str, tmp_path: Path, count: int, per_message: int, labels: int
) -> None:
    _, email, password = await world.seed_user(roles=("user", "admin"))
    metrics_port = free_port()
    # The probe calls back to back: far above the default per-caller rate.
    env = server_env(
        database_url,
        tmp_path / "data",
        USERSVC_RATE_LIMIT_RPS="1000000",
        USERSVC_RATE_LIMIT_BURST="1000000",
        USERSVC_METRICS_ADDR=f"127.0.0.1:{metrics_port}",
    )
    async with served(env, tmp_path / "server.log") as server:
        await server.wait_serving(1)
        async with grpc.aio.insecure_channel(server.address) as channel:
            login = await Caller(channel, None).auth.Login(
                auth_service_pb2.LoginRequest(email=email, password=password)
            )
            token = login.access_token
            started = time.perf_counter()
            async with probing(server.address, token) as probed:
                stub = user_service_pb2_grpc.UserServiceStub(channel)
                before = await asyncio.to_thread(scrape, metrics_port)
                response = await stub.ImportUsers(
                    messages("fair.example.com", count, per_message, labels),
                    metadata=bearer(token),
                    timeout=600,
                )
                after = await asyncio.to_thread(scrape, metrics_port)
            elapsed = time.perf_counter() - started
    (probe,) = probed
    loop = LoopFigures(before, after)
    get_user = sorted(probe.get_user)
    checks = sorted(probe.checks)
    p99 = get_user[int(len(get_user) * 0.99) - 1]
    print(
        f"\nImportUsers of {count} messages x {per_message} users x {labels} labels: "
        f"{elapsed:.1f}s, "
        f"{response.imported_count} imported; during it {len(get_user)} GetUser calls "
        f"(max {get_user[-1] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms) and Health checks "
        f"(max {checks[-1] * 1000:.0f} ms, p99 {checks[int(len(checks) * 0.99) - 1] * 1000:.0f}"
        f" ms), failures {len(probe.failures)}; event loop: {loop}"
    )
    assert response.imported_count == count * per_message
    assert loop.lag.count > 2 * elapsed  # measured all along (up to 100 a second)
    assert loop.hold.above(MAX_HOLD_SECONDS) == 0, str(loop)
    assert not probe.failures, probe.failures[:5]
    assert len(get_user) > 10
    assert set(probe.health) == {health_pb2.HealthCheckResponse.SERVING}
    assert checks[-1] < MAX_HEALTH_SECONDS
    assert p99 < MAX_GET_USER_P99_SECONDS
