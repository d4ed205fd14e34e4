"""Keys and TLS as operators meet them through the ``usersvc`` command: a
SIGHUP reloads the token keys of a running server, and settings that cannot
work stop the server before it serves, with a message naming the cause."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .helpers import Caller, auth_service_pb2
from .pki import Authority
from .test_process import Usersvc

# The fixture of test_process, reused (the explicit re-export keeps it in scope).
from .test_process import usersvc as usersvc

RELOAD_DEADLINE_SECONDS = 30.0


def write_key(path: Path) -> str:
    from usersvc.services.tokens import SigningKey

    key = Ed25519PrivateKey.generate()
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return SigningKey.ed25519(key).kid


async def published_kids(address: str) -> list[str]:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await Caller(channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest())
    return [key["kid"] for key in json.loads(reply.jwks_json)["keys"]]


async def test_sighup_reloads_the_signing_key(usersvc: Usersvc, tmp_path: Path) -> None:
    signing = tmp_path / "signing.pem"
    first = write_key(signing)
    served = usersvc.with_env(USERSVC_JWT_PRIVATE_KEY_FILE=str(signing))
    async with served.serving(tmp_path / "serve.log") as server:
        before = await published_kids(served.listen_addr)
        second = write_key(signing)
        server.send_signal(signal.SIGHUP)
        # The signal is handled on the server's loop; poll, bounded, until
        # the key set shows it.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RELOAD_DEADLINE_SECONDS
        after = before
        while after == before and loop.time() < deadline:
            after = await published_kids(served.listen_addr)
        assert server.returncode is None, "SIGHUP must not stop the server"
    assert (before, after) == ([first], [second])


async def test_serve_with_a_short_hs256_secret_exits_2_naming_the_variable(
    usersvc: Usersvc,
) -> None:
    result = await usersvc.with_env(
        USERSVC_JWT_ALGORITHM="HS256", USERSVC_JWT_HS256_SECRET="too-short"
    ).run("serve")
    assert result.returncode == 2
    assert "USERSVC_JWT_HS256_SECRET must be at least 32 bytes" in result.stderr
    assert "too-short" not in result.stderr


async def test_serve_with_a_tls_key_of_another_certificate_exits_1(
    usersvc: Usersvc, tmp_path: Path
) -> None:
    ca = Authority.create(tmp_path / "pki", "corp")
    server, other = ca.server("server"), ca.server("other")
    result = await usersvc.with_env(
        USERSVC_TLS_CERT_FILE=str(server.cert_file), USERSVC_TLS_KEY_FILE=str(other.key_file)
    ).run("serve")
    assert result.returncode == 1
    assert "USERSVC_TLS_KEY_FILE" in result.stderr
    assert "Traceback" not in result.stderr


async def test_serve_with_an_unreadable_verification_key_exits_1(
    usersvc: Usersvc, tmp_path: Path
) -> None:
    result = await usersvc.with_env(
        USERSVC_JWT_VERIFICATION_KEY_FILES=str(tmp_path / "missing.pem")
    ).run("serve")
    assert result.returncode == 1
    assert "USERSVC_JWT_VERIFICATION_KEY_FILES" in result.stderr
    assert "Traceback" not in result.stderr


async def test_keys_generate_as_a_command_prints_only_the_kid(
    usersvc: Usersvc, tmp_path: Path
) -> None:
    result = await usersvc.run("keys", "generate", "--out", str(tmp_path / "jwt.pem"))
    assert result.returncode == 0, result.stderr
    # One line: the base64url of a SHA-256 (43 characters).
    assert len(result.stdout) == 44
    assert result.stdout.endswith("\n")
    assert (tmp_path / "jwt.pem").stat().st_mode & 0o777 == 0o600
