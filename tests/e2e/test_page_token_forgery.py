"""ListUsers page tokens as an attacker sends them: made up, edited,
truncated, tagged with another key. Every one is INVALID_ARGUMENT naming
page_token (never INTERNAL), and nothing a caller writes into a token (a
cursor, a total) comes back; a real token keeps working, also on a replica
that has rotated to a new signing key while keeping the old one listed."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .conftest import running_server
from .helpers import ResponseRecorder, World, expect_invalid, user_service_pb2

PAGE = 2


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


def listing(page_token: str = "") -> user_service_pb2.ListUsersRequest:
    return user_service_pb2.ListUsersRequest(page_size=PAGE, page_token=page_token)


def default_fingerprint() -> str:
    from usersvc.domain.listing import Filter, Ordering
    from usersvc.services.pagination import query_fingerprint

    return query_fingerprint(Filter(), Ordering(), False)


@pytest_asyncio.fixture(loop_scope="session")
async def issued(world: World) -> tuple[World, str, int]:
    """A world with a few more users, and the real second-page token of the
    default listing with the true total."""
    for _ in range(4):
        await world.seed_user()
    first = await world.admin.users.ListUsers(listing())
    assert first.next_page_token
    return world, first.next_page_token, first.total_size


def forged_bodies(row_id: str) -> list[dict[str, Any]]:
    fingerprint = default_fingerprint()
    return [
        # Times whose UTC form is outside years 1..9999.
        {"v": v, "k": [moment, row_id], "f": fingerprint, "t": 3}
        for v in (1, 2)
        for moment in ("0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00")
    ] + [
        {"v": v, "k": ["2024-01-01T00:00:00+00:00", row_id], "f": fingerprint, "t": 7}
        for v in (1, 2)
    ]


async def test_a_made_up_token_is_invalid_argument_not_internal(
    issued: tuple[World, str, int],
) -> None:
    world, _, _ = issued
    row_id = world.alice.id
    for body in forged_bodies(row_id):
        data = json.dumps(body, separators=(",", ":")).encode()
        # Unsigned, and with a made-up tag in front.
        for token in (b64(data), b64(secrets.token_bytes(32) + data)):
            await expect_invalid(world.admin.users.ListUsers(listing(token)), "page_token")


async def test_an_edited_total_is_refused_not_echoed(issued: tuple[World, str, int]) -> None:
    world, token, total = issued
    raw = unb64(token)
    edited, count = re.subn(rb'"t":\d+', b'"t":999999', raw)
    assert count == 1
    assert total != 999999
    await expect_invalid(world.admin.users.ListUsers(listing(b64(edited))), "page_token")


async def test_an_edited_cursor_is_refused(issued: tuple[World, str, int]) -> None:
    world, token, _ = issued
    raw = unb64(token)
    edited, count = re.subn(rb'"k":\["\d{4}', b'"k":["0001', raw)
    assert count == 1
    await expect_invalid(world.admin.users.ListUsers(listing(b64(edited))), "page_token")


async def test_a_truncated_or_extended_token_is_refused(issued: tuple[World, str, int]) -> None:
    world, token, _ = issued
    for bad in (token[:-1], token[:-6], token[: len(token) // 2], token[:8], token + "A", "A"):
        await expect_invalid(world.admin.users.ListUsers(listing(bad)), "page_token")


async def test_a_real_token_pages_on_with_the_true_total(issued: tuple[World, str, int]) -> None:
    world, token, total = issued
    second = await world.admin.users.ListUsers(listing(token))
    assert len(second.users) == PAGE
    assert second.total_size == total


def _write_pem(path: Path, key: Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


async def test_a_token_of_the_previous_signing_key_pages_on_a_rotated_replica(
    issued: tuple[World, str, int],
    e2e_settings: Any,
    signing_key: Ed25519PrivateKey,
    recorder: ResponseRecorder,
    tmp_path: Path,
) -> None:
    world, token, total = issued
    old = _write_pem(tmp_path / "old.pem", signing_key)
    new = _write_pem(tmp_path / "new.pem", Ed25519PrivateKey.generate())
    rotated = dataclasses.replace(
        e2e_settings,
        jwt_private_key_pem=None,
        jwt_private_key_file=new,
        jwt_verification_key_files=(old,),
    )
    async with running_server(rotated, recorder) as replica:
        from .helpers import Caller

        admin = Caller(replica.channel, world.admin.token, "admin")
        page = await admin.users.ListUsers(listing(token))
        assert page.total_size == total
        assert len(page.users) == PAGE
        # Its own new tokens are tagged with the new key: the first server,
        # which does not know it, refuses them.
        fresh = (await admin.users.ListUsers(listing())).next_page_token
    await expect_invalid(world.admin.users.ListUsers(listing(fresh)), "page_token")


@pytest.mark.parametrize("garbage", ["!!!!", "a" * 2000, "AAAA", b64(b"{}"), b64(b"\xff" * 40)])
async def test_garbage_is_refused(issued: tuple[World, str, int], garbage: str) -> None:
    world, _, _ = issued
    await expect_invalid(world.admin.users.ListUsers(listing(garbage)), "page_token")
