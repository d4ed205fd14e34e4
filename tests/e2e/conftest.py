"""Fixtures of the end-to-end tier: real servers on port 0 over the migrated
test database (``database_url`` / ``clean_db`` come from tests/conftest.py),
client channels that record every response, and a fresh set of logged-in
users per test."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .helpers import Caller, ResponseRecorder, World, auth_service_pb2


@dataclasses.dataclass
class RunningServer:
    container: Any  # usersvc.bootstrap.Container
    server: Any  # usersvc.server.UsersvcServer
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@asynccontextmanager
async def running_server(
    settings: Any, recorder: ResponseRecorder, **bootstrap_options: Any
) -> AsyncIterator[RunningServer]:
    """A real server on an ephemeral port and a recording channel to it;
    ``bootstrap_options`` go to usersvc.bootstrap.bootstrap (a clock)."""
    from usersvc.bootstrap import bootstrap
    from usersvc.server import UsersvcServer

    container = bootstrap(settings, database_url=settings.database_url, **bootstrap_options)
    try:
        server = await UsersvcServer.start(container, listen_addr="127.0.0.1:0")
        try:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", interceptors=[recorder])
            try:
                yield RunningServer(container, server, channel)
            finally:
                await channel.close()
        finally:
            await server.stop(0)
    finally:
        await container.aclose()


@pytest.fixture(scope="session")
def recorder() -> ResponseRecorder:
    return ResponseRecorder()


@pytest.fixture(autouse=True)
def no_secret_in_any_response(recorder: ResponseRecorder) -> Iterator[None]:
    """Every response of the suite is searched for bcrypt hashes and the
    passwords the suite used; a leak fails the test that caused it."""
    mark = len(recorder.responses)
    yield
    leaks = recorder.leaks(since=mark)
    assert not leaks, f"secrets in responses: {leaks}"


@pytest.fixture(scope="session")
def signing_key() -> Ed25519PrivateKey:
    """The servers' signing key, known to the tests so they can mint tokens
    the servers must judge (expired, wrong audience, ...)."""
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="session")
def e2e_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("usersvc-e2e")


@pytest.fixture(scope="session")
def e2e_settings(database_url: str, e2e_data_dir: Path, signing_key: Ed25519PrivateKey) -> Any:
    from usersvc.config import Settings

    pem = signing_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return dataclasses.replace(
        Settings(),
        database_url=database_url,
        data_dir=e2e_data_dir,
        bcrypt_rounds=4,
        allow_signup=True,
        jwt_private_key_pem=pem,
        listen_addr="127.0.0.1:0",
        shutdown_grace_seconds=1.0,
        # Every test logs its users in from 127.0.0.1 within moments; the
        # default Login/sign-up bucket (5/s, burst 10) is for real clients.
        # tests/e2e/test_rate_limits.py tests the limits on servers of its own.
        auth_rate_limit_rps=100_000.0,
        auth_rate_limit_burst=100_000,
    )


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def primary(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    """The server most tests talk to (sign-up enabled)."""
    async with running_server(e2e_settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def signup_closed(
    e2e_settings: Any, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """A server on the same database with self sign-up disabled."""
    settings = dataclasses.replace(e2e_settings, allow_signup=False)
    async with running_server(settings, recorder) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="session")
async def replica(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    """Another replica: its own process state, the same database and key."""
    async with running_server(e2e_settings, recorder) as running:
        yield running


@pytest.fixture(scope="session")
def anonymous(primary: RunningServer) -> Caller:
    return Caller(primary.channel, None)


@pytest_asyncio.fixture(loop_scope="session")
async def world(primary: RunningServer, recorder: ResponseRecorder, clean_db: Any) -> World:
    """An empty database plus admin, service, alice and bob, logged in."""
    return await World(
        user_service=primary.container.user_service, channel=primary.channel, recorder=recorder
    ).populate()


@pytest_asyncio.fixture(loop_scope="session")
async def jwks(anonymous: Caller) -> dict[str, Any]:
    response = await anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest())
    keys: dict[str, Any] = json.loads(response.jwks_json)
    return keys
