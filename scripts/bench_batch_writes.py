"""Measure BatchUpdateUsers against single UpdateUser calls: 1000 users
updated by one batch, by 1000 calls one after another, and by 1000 calls
with 32 in flight.

Uses the set-up of scripts/bench_import.py: a database of its own on the
PostgreSQL server of ``--server-url`` (dropped at the end), ``usersvc
serve`` as a separate process with production settings but rate limits, an
admin created from the console. The users are created once; each run
renames all of them three ways, in an order that changes from run to run.

    .venv/bin/python scripts/bench_batch_writes.py --users 1000 --runs 3

Prints one line per run and the medians; exit status 1 when a batch or a
single call did not write what it was asked to.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from google.protobuf import field_mask_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_import

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_pb2,
    user_service_pb2,
    user_service_pb2_grpc,
)

IN_FLIGHT = 32
CALL_TIMEOUT_SECONDS = 120.0
NAME_MASK = field_mask_pb2.FieldMask(paths=["display_name"])


def rename(user_id: str, name: str) -> user_service_pb2.UpdateUserRequest:
    return user_service_pb2.UpdateUserRequest(
        user=user_pb2.User(id=user_id, display_name=name), update_mask=NAME_MASK
    )


async def seed(stub: user_service_pb2_grpc.UserServiceStub, meta: tuple, count: int) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, 1000):
        response = await stub.BatchCreateUsers(
            user_service_pb2.BatchCreateUsersRequest(
                requests=[
                    user_service_pb2.CreateUserRequest(
                        email=f"batch-{n}-{secrets.token_hex(3)}@example.com",
                        password=f"Batch-bench-pass-{n}",
                    )
                    for n in range(start, min(start + 1000, count))
                ]
            ),
            metadata=meta,
            timeout=CALL_TIMEOUT_SECONDS,
        )
        ids.extend(user.id for user in response.users)
    return ids


async def timed(work: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await work()
    return time.perf_counter() - started


async def measure(args: argparse.Namespace, address: str) -> int:
    figures: dict[str, list[float]] = {"batch": [], "sequential": [], "concurrent": []}
    async with grpc.aio.insecure_channel(address) as channel:
        login = await auth_service_pb2_grpc.AuthServiceStub(channel).Login(
            auth_service_pb2.LoginRequest(
                email=bench_import.ADMIN_EMAIL, password=bench_import.ADMIN_PASSWORD
            )
        )
        meta = (("authorization", f"Bearer {login.access_token}"),)
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        ids = await seed(stub, meta, args.users)

        async def batch(tag: str) -> None:
            requests = [rename(i, f"{tag} {n}") for n, i in enumerate(ids)]
            for start in range(0, len(requests), 1000):
                await stub.BatchUpdateUsers(
                    user_service_pb2.BatchUpdateUsersRequest(
                        requests=requests[start : start + 1000]
                    ),
                    metadata=meta,
                    timeout=CALL_TIMEOUT_SECONDS,
                )

        async def sequential(tag: str) -> None:
            for n, i in enumerate(ids):
                await stub.UpdateUser(rename(i, f"{tag} {n}"), metadata=meta, timeout=30)

        async def concurrent(tag: str) -> None:
            gate = asyncio.Semaphore(IN_FLIGHT)

            async def one(n: int, user_id: str) -> None:
                async with gate:
                    await stub.UpdateUser(rename(user_id, f"{tag} {n}"), metadata=meta, timeout=30)

            await asyncio.gather(*(one(n, i) for n, i in enumerate(ids)))

        ways = {"batch": batch, "sequential": sequential, "concurrent": concurrent}
        for run in range(args.runs):
            order = list(ways)[run % 3 :] + list(ways)[: run % 3]
            line = []
            for name in order:
                tag = f"r{run}-{name}"
                seconds = await timed(lambda way=ways[name], tag=tag: way(tag))
                figures[name].append(seconds)
                line.append(f"{name} {seconds * 1000:.0f} ms")
                check = await stub.BatchGetUsers(
                    user_service_pb2.BatchGetUsersRequest(ids=ids[:1000]), metadata=meta
                )
                if any(not u.display_name.startswith(tag + " ") for u in check.users):
                    print(f"FAIL: {name} did not write every user", file=sys.stderr)
                    return 1
            print(f"run {run + 1}: " + ", ".join(line), flush=True)
    batch_median = statistics.median(figures["batch"])
    for name in ("sequential", "concurrent"):
        median = statistics.median(figures[name])
        print(
            f"{args.users} users: one batch {batch_median * 1000:.0f} ms, {name} single calls "
            f"{median * 1000:.0f} ms: the batch is {median / batch_median:.1f}x faster "
            f"(median of {args.runs})"
        )
    return 0


def main(args: argparse.Namespace) -> int:
    name = f"usersvc_batchbench_{secrets.token_hex(4)}"
    database_url = f"{args.server_url.rsplit('/', 1)[0]}/{name}"
    asyncio.run(bench_import.admin_sql(args.server_url, f'CREATE DATABASE "{name}"'))
    work = Path(tempfile.mkdtemp(prefix="usersvc-batchbench-"))
    address = f"127.0.0.1:{bench_import.free_port()}"
    env = bench_import.server_env(database_url, address, work)
    usersvc = str(bench_import.ROOT / ".venv" / "bin" / "usersvc")
    server: subprocess.Popen[bytes] | None = None
    try:
        subprocess.run([usersvc, "migrate"], env=env, check=True, capture_output=True)  # noqa: S603
        subprocess.run(  # noqa: S603
            [usersvc, "create-admin", "--email", bench_import.ADMIN_EMAIL],
            env={**env, "USERSVC_ADMIN_PASSWORD": bench_import.ADMIN_PASSWORD},
            check=True,
            capture_output=True,
        )
        with (work / "server.log").open("wb") as log:
            server = subprocess.Popen([usersvc, "serve"], env=env, stdout=log, stderr=log)  # noqa: S603
        asyncio.run(bench_import.wait_serving(address, server, 60.0))
        return asyncio.run(measure(args, address))
    finally:
        if server is not None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
        asyncio.run(
            bench_import.admin_sql(
                args.server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
            )
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--server-url",
        default="postgresql+asyncpg://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL server URL whose user may create databases",
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main(parse_args()))
