"""Measure UserService.ImportUsers: users imported per second.

Creates a database of its own on the PostgreSQL server of
``--server-url`` (migrated, dropped at the end), starts ``usersvc serve`` on
it as a separate process (production settings but rate limits, bcrypt cost
4 for the admin's login), creates and logs in an admin, then streams
``--users`` users from one grpc.aio client in messages of ``--chunk``
users. The request messages are built and serialized before the clock
starts (the hashes are a few precomputed bcrypt strings), so the figure is
the server's and the database's, not the client's protobuf encoding.

    .venv/bin/python scripts/bench_import.py --users 100000 --chunk 1000 --runs 3

Prints one line per run and the median; exit status 1 when a run imported
fewer users than it sent (the import must not lose rows).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import bcrypt
import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from usersvc_protos.v1 import (  # noqa: E402
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
)

IMPORT_METHOD = "/usersvc.v1.UserService/ImportUsers"
ADMIN_EMAIL = "bench-admin@example.com"
ADMIN_PASSWORD = "Import-bench-admin-1!"  # noqa: S105 (a throwaway database's admin)
CALL_TIMEOUT_SECONDS = 600.0
DISTINCT_HASHES = 16


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def import_messages(count: int, chunk: int, *, tag: str) -> list[bytes]:
    """``count`` users in serialized ImportUsersRequest messages of ``chunk``
    users: unique emails, a display name, a label, one of a few cost-4
    bcrypt hashes."""
    hashes = [
        bcrypt.hashpw(f"imported-{i}".encode(), bcrypt.gensalt(4)).decode()
        for i in range(DISTINCT_HASHES)
    ]
    messages = []
    for start in range(0, count, chunk):
        users = [
            user_service_pb2.ImportedUser(
                email=f"imported-{tag}-{n}@example.com",
                password_hash=hashes[n % DISTINCT_HASHES],
                display_name=f"Imported User {n}",
                labels={"source": "bench"},
            )
            for n in range(start, min(start + chunk, count))
        ]
        messages.append(user_service_pb2.ImportUsersRequest(users=users).SerializeToString())
    return messages


async def stream_import(
    channel: grpc.aio.Channel, token: str, messages: Sequence[bytes]
) -> user_service_pb2.ImportUsersResponse:
    """One ImportUsers call sending the pre-serialized ``messages``."""
    call = channel.stream_unary(
        IMPORT_METHOD,
        request_serializer=None,  # bytes as they are
        response_deserializer=user_service_pb2.ImportUsersResponse.FromString,
    )

    async def requests() -> AsyncIterator[bytes]:
        for message in messages:
            yield message

    response: user_service_pb2.ImportUsersResponse = await call(
        requests(), metadata=(("authorization", f"Bearer {token}"),), timeout=CALL_TIMEOUT_SECONDS
    )
    return response


async def wait_serving(address: str, server: subprocess.Popen[bytes], within: float) -> None:
    deadline = time.monotonic() + within
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"usersvc serve exited with {server.returncode}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise RuntimeError("usersvc serve did not become SERVING in time")


async def admin_sql(server_url: str, statement: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    connection = await asyncpg.connect(server_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


async def count_users(database_url: str) -> int:
    import asyncpg

    connection = await asyncpg.connect(database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return int(await connection.fetchval("SELECT count(*) FROM users"))
    finally:
        await connection.close()


def main(args: argparse.Namespace) -> int:
    name = f"usersvc_importbench_{secrets.token_hex(4)}"
    database_url = f"{args.server_url.rsplit('/', 1)[0]}/{name}"
    asyncio.run(admin_sql(args.server_url, f'CREATE DATABASE "{name}"'))
    work = Path(tempfile.mkdtemp(prefix="usersvc-importbench-"))
    address = f"127.0.0.1:{free_port()}"
    env = server_env(database_url, address, work)
    usersvc = str(ROOT / ".venv" / "bin" / "usersvc")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        subprocess.run([usersvc, "migrate"], env=env, check=True, capture_output=True)  # noqa: S603
        subprocess.run(  # noqa: S603
            [usersvc, "create-admin", "--email", ADMIN_EMAIL],
            env={**env, "USERSVC_ADMIN_PASSWORD": ADMIN_PASSWORD},
            check=True,
            capture_output=True,
        )
        with (work / "server.log").open("wb") as log:
            server = subprocess.Popen([usersvc, "serve"], env=env, stdout=log, stderr=log)  # noqa: S603
        processes.append(server)
        asyncio.run(wait_serving(address, server, 60.0))
        if args.profile:
            # py-spy (a dev tool in the venv) samples the server while it imports.
            spy = str(ROOT / ".venv" / "bin" / "py-spy")
            command = [spy, "record", "--pid", str(server.pid), "--format", "raw"]
            command += ["--output", args.profile, "--rate", "200"]
            processes.insert(0, subprocess.Popen(command, stderr=subprocess.DEVNULL))  # noqa: S603
        return asyncio.run(measure(args, address, database_url, server.pid))
    finally:
        for process in processes:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        asyncio.run(admin_sql(args.server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def server_env(database_url: str, address: str, work: Path) -> dict[str, str]:
    """``usersvc serve`` with production settings but rate limits (one
    client sends everything), a signing key of its own, bcrypt cost 4."""
    key = work / "signing-key.pem"
    key.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("USERSVC_")}
    env.update(
        USERSVC_ENV="production",
        USERSVC_DATABASE_URL=database_url,
        USERSVC_LISTEN_ADDR=address,
        USERSVC_JWT_PRIVATE_KEY_FILE=str(key),
        USERSVC_BCRYPT_ROUNDS="4",
        USERSVC_DATA_DIR=str(work),
        USERSVC_RATE_LIMIT_RPS="1000000",
        USERSVC_RATE_LIMIT_BURST="1000000",
        USERSVC_AUTH_RATE_LIMIT_RPS="1000000",
        USERSVC_AUTH_RATE_LIMIT_BURST="1000000",
        USERSVC_LOG_FORMAT="json",
    )
    return env


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args: argparse.Namespace, address: str, database_url: str, pid: int) -> int:
    rates = []
    async with grpc.aio.insecure_channel(address) as channel:
        login = await auth_service_pb2_grpc.AuthServiceStub(channel).Login(
            auth_service_pb2.LoginRequest(email=ADMIN_EMAIL, password=ADMIN_PASSWORD)
        )
        for run in range(args.runs):
            messages = import_messages(args.users, args.chunk, tag=f"r{run}")
            before = await count_users(database_url)
            started, cpu_before = time.perf_counter(), cpu_seconds(pid)
            response = await stream_import(channel, login.access_token, messages)
            elapsed = time.perf_counter() - started
            # What the server process spent per user, whatever else the
            # machine was doing: its ceiling on a core of its own.
            cpu_us = (cpu_seconds(pid) - cpu_before) / max(response.imported_count, 1) * 1e6
            stored = await count_users(database_url) - before
            rate = response.imported_count / elapsed
            rates.append(rate)
            print(
                f"run {run + 1}: {response.imported_count} imported, "
                f"{response.failed_count} failed, {stored} rows stored, "
                f"{elapsed:.2f} s, {rate:,.0f} users/s, server CPU {cpu_us:.1f} us/user",
                flush=True,
            )
            if response.imported_count != args.users or stored != args.users:
                print("FAIL: not every user was imported", file=sys.stderr)
                return 1
        # Control: the first run's users again are all EMAIL_ALREADY_EXISTS.
        again = await stream_import(
            channel, login.access_token, import_messages(args.chunk, args.chunk, tag="r0")
        )
        if (again.imported_count, again.failed_count) != (0, args.chunk):
            print(f"FAIL: a repeated import was not refused: {again}", file=sys.stderr)
            return 1
    print(
        f"median of {len(rates)}: {statistics.median(rates):,.0f} users/s "
        f"({args.users} users per run, {args.chunk} per message, load average "
        f"{os.getloadavg()[0]:.2f})"
    )
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, default=1000, help="users per request message")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", help="write a py-spy profile (raw format) of the server here")
    parser.add_argument(
        "--server-url",
        default=os.environ.get(
            "USERSVC_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
        ),
        help="a PostgreSQL server where a database may be created (asyncpg URL)",
    )
    return parser.parse_args()


if __name__ == "__main__":
    sys.exit(main(parse_args()))
