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
asks, by name, for the ``served_with_admin`` fixture of tests/conftest.py:
``usersvc migrate``, ``usersvc create-admin`` and ``usersvc serve`` as
subprocesses, on a free port and a fresh database of the test PostgreSQL
server.
"""

from __future__ import annotations

import os
import secrets
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


@pytest.fixture(scope="session")
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    address = os.environ.get(ADDR_ENV, "").strip()
    if address:
        yield Target(address, os.environ.get(ADMIN_EMAIL_ENV), os.environ.get(ADMIN_PASSWORD_ENV))
        return
    yield from _local_server(request)


def _local_server(request: pytest.FixtureRequest) -> Iterator[Target]:
    # By name: the fixture lives in the repository's tests/conftest.py, so
    # this suite imports none of the repository's code.
    served: dict[str, str] = request.getfixturevalue("served_with_admin")
    yield Target(served["address"], served["admin_email"], served["admin_password"])


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
            grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.UNAUTHENTICATED,
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
