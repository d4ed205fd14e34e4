"""The consumer contract suite: the public API of usersvc (docs/api.md) checked
against a live server over the network, with nothing but the server's own
reflection and public protobuf/gRPC packages.

Run it against any server:

    USERSVC_CONTRACT_ADDR=host:50051 pytest tests/contract

Optional:
- ``USERSVC_CONTRACT_ADMIN_EMAIL`` / ``USERSVC_CONTRACT_ADMIN_PASSWORD``: an
  admin account; the listing tests need it and skip without it.
- ``USERSVC_CONTRACT_CA_FILE``: PEM roots; the server is then called over TLS.

The suite signs up users named ``contract-<random>@example.com`` (as an admin
when self sign-up is disabled); it deletes nothing.

Without ``USERSVC_CONTRACT_ADDR`` (as in this repository's ``make test``) it
starts one: ``usersvc migrate``, ``usersvc create-admin`` and ``usersvc
serve`` as subprocesses, on a free port and a fresh database of the test
PostgreSQL server (the ``pg_server_url`` fixture of tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from .client import AUTH_SERVICE, USER_SERVICE, CallFailed, ReflectedApi, Reply

ADDR_ENV = "USERSVC_CONTRACT_ADDR"
ADMIN_EMAIL_ENV = "USERSVC_CONTRACT_ADMIN_EMAIL"
ADMIN_PASSWORD_ENV = "USERSVC_CONTRACT_ADMIN_PASSWORD"
CA_FILE_ENV = "USERSVC_CONTRACT_CA_FILE"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
STARTUP_DEADLINE_SECONDS = 60.0


@dataclass(frozen=True)
class Target:
    address: str
    admin_email: str | None
    admin_password: str | None


@dataclass(frozen=True)
class Account:
    email: str
    password: str
    user_id: str
    access_token: str


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _usersvc() -> list[str]:
    script = PROJECT_ROOT / ".venv" / "bin" / "usersvc"
    return [str(script)] if script.exists() else [sys.executable, "-m", "usersvc"]


def _admin_sql(server_url: str, statement: str) -> None:
    # CREATE/DROP DATABASE on a connection of their own, outside a transaction.
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    async def run() -> None:
        engine = create_async_engine(server_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        try:
            async with engine.connect() as connection:
                await connection.exec_driver_sql(statement)
        finally:
            await engine.dispose()

    # In a thread of its own: asyncio.run must not replace the event loop of
    # the thread that pytest-asyncio runs the rest of the session on.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as worker:
        worker.submit(asyncio.run, run()).result()


def _wait_until_serving(env: dict[str, str], server: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_DEADLINE_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"usersvc serve exited with {server.returncode}:\n{log.read_text()}")
        check = subprocess.run(
            [*_usersvc(), "healthcheck", "--timeout", "2"],
            env=env, capture_output=True, timeout=30, check=False,
        )
        if check.returncode == 0:
            return
    pytest.fail(f"usersvc serve not SERVING within {STARTUP_DEADLINE_SECONDS}s:\n{log.read_text()}")


@pytest.fixture(scope="session")
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    address = os.environ.get(ADDR_ENV, "").strip()
    if address:
        yield Target(
            address, os.environ.get(ADMIN_EMAIL_ENV), os.environ.get(ADMIN_PASSWORD_ENV)
        )
        return
    yield from _local_server(request, tmp_path_factory)


def _local_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    from sqlalchemy.engine import make_url

    server_url: str = request.getfixturevalue("pg_server_url")
    database = f"usersvc_contract_{secrets.token_hex(6)}"
    database_url = make_url(server_url).set(database=database).render_as_string(
        hide_password=False
    )
    _admin_sql(server_url, f'CREATE DATABASE "{database}"')
    workdir = tmp_path_factory.mktemp("contract-server")
    admin_email = "contract-admin@example.com"
    admin_password = f"contract admin {secrets.token_hex(8)}"
    env = {key: value for key, value in os.environ.items() if not key.startswith("USERSVC_")}
    env.update(
        USERSVC_DATABASE_URL=database_url,
        USERSVC_LISTEN_ADDR=f"127.0.0.1:{_free_port()}",
        USERSVC_DATA_DIR=str(workdir / "data"),
        USERSVC_ALLOW_SIGNUP="true",
        USERSVC_BCRYPT_ROUNDS="4",
        # The suite signs up and logs in from one address within moments.
        USERSVC_AUTH_RATE_LIMIT_RPS="1000",
        USERSVC_AUTH_RATE_LIMIT_BURST="1000",
        USERSVC_LOG_FORMAT="text",
    )
    log = workdir / "serve.log"
    try:
        for command in (["migrate"], ["create-admin", "--email", admin_email]):
            done = subprocess.run(
                [*_usersvc(), *command],
                env={**env, "USERSVC_ADMIN_PASSWORD": admin_password},
                cwd=workdir, capture_output=True, text=True, timeout=120, check=False,
            )
            assert done.returncode == 0, f"usersvc {command}: {done.stdout}{done.stderr}"
        with log.open("wb") as sink:
            server = subprocess.Popen(
                [*_usersvc(), "serve"], env=env, cwd=workdir,
                stdin=subprocess.DEVNULL, stdout=sink, stderr=sink,
            )
        try:
            _wait_until_serving(env, server, log)
            yield Target(env["USERSVC_LISTEN_ADDR"], admin_email, admin_password)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    finally:
        _admin_sql(server_url, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


@pytest.fixture(scope="session")
def channel(target: Target) -> Iterator[grpc.Channel]:
    ca_file = os.environ.get(CA_FILE_ENV)
    if ca_file:
        credentials = grpc.ssl_channel_credentials(Path(ca_file).read_bytes())
        with grpc.secure_channel(target.address, credentials) as secure:
            yield secure
    else:
        with grpc.insecure_channel(target.address) as plain:
            yield plain


@pytest.fixture(scope="session")
def api(channel: grpc.Channel) -> ReflectedApi:
    return ReflectedApi(channel)


def new_email() -> str:
    return f"contract-{secrets.token_hex(8)}@example.com"


def new_password() -> str:
    return f"contract passphrase {secrets.token_hex(8)}"


def login(api: ReflectedApi, email: str, password: str) -> str:
    reply = api.call(f"{AUTH_SERVICE}.Login", email=email, password=password)
    token: str = reply.message.access_token
    return token


@pytest.fixture(scope="session")
def admin_token(api: ReflectedApi, target: Target) -> str:
    if not (target.admin_email and target.admin_password):
        pytest.skip(f"set {ADMIN_EMAIL_ENV} and {ADMIN_PASSWORD_ENV} for the admin checks")
    return login(api, target.admin_email, target.admin_password)


def create_user(api: ReflectedApi, request: pytest.FixtureRequest, **fields: Any) -> Reply:
    """CreateUser by self sign-up, or as the admin where sign-up is closed
    (skipped when it is closed and no admin is configured). Raises
    CallFailed."""
    try:
        return api.call(f"{USER_SERVICE}.CreateUser", **fields)
    except CallFailed as error:
        if error.failure.code not in (
            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
        ):
            raise
    token = request.getfixturevalue("admin_token")  # skips without an admin
    return api.call(f"{USER_SERVICE}.CreateUser", token=token, **fields)


def sign_up(api: ReflectedApi, request: pytest.FixtureRequest) -> Account:
    """A new user, logged in."""
    email, password = new_email(), new_password()
    created = create_user(api, request, email=email, password=password, display_name="Contract")
    return Account(email, password, created.message.user.id, login(api, email, password))


@pytest.fixture(scope="session")
def account(api: ReflectedApi, request: pytest.FixtureRequest) -> Account:
    return sign_up(api, request)
