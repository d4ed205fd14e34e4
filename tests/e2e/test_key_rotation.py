"""Signing-key rotation by kid, key reload without a restart, and HS256, each
against real servers on the shared test database.

A rotation as an operator runs it: the new key signs while the old one is
listed in USERSVC_JWT_VERIFICATION_KEY_FILES (its tokens keep working, the
key set publishes both); once its tokens have expired the old key is removed,
and anything it signed is refused."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    auth_service_pb2,
    expect_token_invalid,
    new_email,
    new_password,
    user_service_pb2,
)

ME = user_service_pb2.GetUserRequest(id="me")
HS256_SECRET = "an HS256 secret for the tests, longer than 32 bytes"


@dataclasses.dataclass(frozen=True)
class KeyFiles:
    old: Path
    new: Path


@pytest.fixture
def keys(tmp_path: Path) -> KeyFiles:
    files = KeyFiles(old=tmp_path / "old.pem", new=tmp_path / "new.pem")
    for path in (files.old, files.new):
        write_key(path, Ed25519PrivateKey.generate())
    return files


def write_key(path: Path, key: Ed25519PrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def kid_of(path: Path) -> str:
    from usersvc.services.tokens import SigningKey

    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return SigningKey.ed25519(key).kid


def settings_with(e2e_settings: Any, **changes: Any) -> Any:
    return dataclasses.replace(e2e_settings, jwt_private_key_pem=None, **changes)


@asynccontextmanager
async def server_with(
    e2e_settings: Any, recorder: ResponseRecorder, **changes: Any
) -> AsyncIterator[RunningServer]:
    async with running_server(settings_with(e2e_settings, **changes), recorder) as running:
        yield running


async def signed_in(server: RunningServer, recorder: ResponseRecorder) -> str:
    """A new user, logged in on ``server``; returns the access token."""
    from usersvc.domain.models import ROLE_ADMIN, Principal, PrincipalKind
    from usersvc.services.inputs import CreateUserInput

    operator = Principal(kind=PrincipalKind.SERVICE, subject="e2e", roles=frozenset({ROLE_ADMIN}))
    email, password = new_email("rotation"), new_password(recorder)
    await server.container.user_service.create_user(
        principal=operator,
        request=CreateUserInput(
            email=email, password=password, display_name="", roles=("user",), labels={}
        ),
    )
    login = await Caller(server.channel, None).auth.Login(
        auth_service_pb2.LoginRequest(email=email, password=password)
    )
    return str(login.access_token)


async def is_accepted(server: RunningServer, token: str) -> bool:
    try:
        await Caller(server.channel, token).users.GetUser(ME)
    except grpc.aio.AioRpcError:
        return False
    return True


async def published_kids(server: RunningServer) -> list[str]:
    reply = await Caller(server.channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest())
    return [key["kid"] for key in json.loads(reply.jwks_json)["keys"]]


# -- rotation across restarts ----------------------------------------------------------


async def test_a_token_of_the_old_key_verifies_while_the_old_key_is_listed(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles
) -> None:
    async with server_with(e2e_settings, recorder, jwt_private_key_file=keys.old) as before:
        old_token = await signed_in(before, recorder)
    async with server_with(
        e2e_settings,
        recorder,
        jwt_private_key_file=keys.new,
        jwt_verification_key_files=(keys.old,),
    ) as during:
        assert await is_accepted(during, old_token)


async def test_during_a_rotation_the_key_set_lists_both_kids_new_first(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles
) -> None:
    async with server_with(
        e2e_settings,
        recorder,
        jwt_private_key_file=keys.new,
        jwt_verification_key_files=(keys.old,),
    ) as during:
        assert await published_kids(during) == [kid_of(keys.new), kid_of(keys.old)]


async def test_during_a_rotation_new_tokens_are_signed_by_the_new_key(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles
) -> None:
    async with server_with(
        e2e_settings,
        recorder,
        jwt_private_key_file=keys.new,
        jwt_verification_key_files=(keys.old,),
    ) as during:
        token = await signed_in(during, recorder)
    assert jwt.get_unverified_header(token)["kid"] == kid_of(keys.new)


async def test_after_the_old_key_is_removed_its_tokens_are_token_invalid(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles
) -> None:
    async with server_with(e2e_settings, recorder, jwt_private_key_file=keys.old) as before:
        old_token = await signed_in(before, recorder)
    async with server_with(e2e_settings, recorder, jwt_private_key_file=keys.new) as after:
        await expect_token_invalid(Caller(after.channel, old_token).users.GetUser(ME))
        assert await published_kids(after) == [kid_of(keys.new)]


# -- reload without a restart (SIGHUP) ----------------------------------------------------------


async def test_a_reload_that_drops_the_old_key_refuses_its_cached_tokens(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles, tmp_path: Path
) -> None:
    from usersvc.server import reload_keys

    listed = tmp_path / "listed.pem"
    listed.write_bytes(keys.old.read_bytes())
    async with server_with(e2e_settings, recorder, jwt_private_key_file=keys.old) as before:
        old_token = await signed_in(before, recorder)
    async with server_with(
        e2e_settings,
        recorder,
        jwt_private_key_file=keys.new,
        jwt_verification_key_files=(listed,),
    ) as server:
        assert await is_accepted(server, old_token)  # verified, now cached
        listed.write_bytes(keys.new.read_bytes())  # the old key leaves the file
        assert reload_keys(server.container)
        await expect_token_invalid(Caller(server.channel, old_token).users.GetUser(ME))
        assert await published_kids(server) == [kid_of(keys.new)]


async def test_a_reload_picks_up_a_new_signing_key(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles, tmp_path: Path
) -> None:
    from usersvc.server import reload_keys

    signing = tmp_path / "signing.pem"
    signing.write_bytes(keys.old.read_bytes())
    async with server_with(
        e2e_settings,
        recorder,
        jwt_private_key_file=signing,
        jwt_verification_key_files=(keys.old,),
    ) as server:
        signing.write_bytes(keys.new.read_bytes())
        assert reload_keys(server.container)
        token = await signed_in(server, recorder)
        assert jwt.get_unverified_header(token)["kid"] == kid_of(keys.new)
        assert await is_accepted(server, token)


async def test_a_reload_with_a_broken_key_file_keeps_the_keys_in_use(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles, tmp_path: Path
) -> None:
    from usersvc.server import reload_keys

    signing = tmp_path / "signing.pem"
    signing.write_bytes(keys.old.read_bytes())
    async with server_with(e2e_settings, recorder, jwt_private_key_file=signing) as server:
        token = await signed_in(server, recorder)
        signing.write_text("half-written")
        assert not reload_keys(server.container)
        assert await is_accepted(server, token)
        assert await published_kids(server) == [kid_of(keys.old)]


# -- HS256 ------------------------------------------------------------------------------------


async def test_an_hs256_server_issues_hs256_tokens_it_accepts(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    async with server_with(
        e2e_settings, recorder, jwt_algorithm="HS256", jwt_hs256_secret=HS256_SECRET
    ) as server:
        token = await signed_in(server, recorder)
        assert await is_accepted(server, token)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


async def test_an_hs256_server_publishes_an_empty_key_set(
    e2e_settings: Any, recorder: ResponseRecorder
) -> None:
    async with server_with(
        e2e_settings, recorder, jwt_algorithm="HS256", jwt_hs256_secret=HS256_SECRET
    ) as server:
        assert await published_kids(server) == []


async def test_an_hs256_server_refuses_eddsa_tokens_of_keys_it_does_not_list(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles
) -> None:
    async with server_with(e2e_settings, recorder, jwt_private_key_file=keys.old) as before:
        eddsa_token = await signed_in(before, recorder)
    async with server_with(
        e2e_settings, recorder, jwt_algorithm="HS256", jwt_hs256_secret=HS256_SECRET
    ) as server:
        await expect_token_invalid(Caller(server.channel, eddsa_token).users.GetUser(ME))


async def test_moving_from_eddsa_to_hs256_keeps_the_old_tokens_valid(
    e2e_settings: Any, recorder: ResponseRecorder, keys: KeyFiles
) -> None:
    async with server_with(e2e_settings, recorder, jwt_private_key_file=keys.old) as before:
        eddsa_token = await signed_in(before, recorder)
    async with server_with(
        e2e_settings,
        recorder,
        jwt_algorithm="HS256",
        jwt_hs256_secret=HS256_SECRET,
        jwt_verification_key_files=(keys.old,),
    ) as server:
        assert await is_accepted(server, eddsa_token)
        assert await published_kids(server) == [kid_of(keys.old)]
