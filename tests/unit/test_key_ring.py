"""Several keys at once (usersvc.services.tokens, read by
usersvc.adapters.keys): verification keys from files, HS256, key files made
by ``generate_key_file``, and the verified-token
cache when the ring changes. These tests touch only pytest's tmp_path."""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from usersvc.adapters.keys import generate_key_file
from usersvc.bootstrap import load_key_ring
from usersvc.config import Settings
from usersvc.domain.errors import TokenInvalid
from usersvc.domain.keys import KeyConfigError, jwk_thumbprint
from usersvc.domain.models import User
from usersvc.services.tokens import HS256, KeyRing, SigningKey, TokenService

LOGGER = logging.getLogger("tests.key_ring")
SECRET = b"0123456789abcdef0123456789abcdef"
ISSUER = AUDIENCE = "usersvc"


def a_user() -> User:
    now = datetime.now(UTC)
    return User(
        id=uuid.uuid4(),
        email="ann@example.com",
        display_name="Ann",
        roles=("user",),
        labels={},
        create_time=now,
        update_time=now,
        disable_time=None,
        delete_time=None,
        version=1,
    )


def service_with(ring: KeyRing) -> TokenService:
    return TokenService(ring, issuer=ISSUER, audience=AUDIENCE, access_ttl_seconds=900)


def token_of(ring: KeyRing) -> str:
    token, _ = service_with(ring).issue_access_token(a_user(), session_id="s-1")
    return token


def private_pem(key: Any) -> bytes:
    return key.private_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_pem(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class DecodeCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        real = jwt.decode

        def counting(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(jwt, "decode", counting)


# -- HS256 ---------------------------------------------------------------------------------


def test_an_hs256_ring_issues_tokens_it_verifies() -> None:
    ring = KeyRing(SigningKey.hs256(SECRET))
    token = token_of(ring)
    assert jwt.get_unverified_header(token)["alg"] == HS256
    assert service_with(ring).verify_access_token(token).session_id == "s-1"


def test_an_hs256_kid_is_the_thumbprint_of_the_oct_key() -> None:
    key = SigningKey.hs256(SECRET)
    encoded = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY"  # base64url of SECRET
    assert key.kid == jwk_thumbprint({"kty": "oct", "k": encoded})


def test_an_hs256_secret_under_32_bytes_is_refused() -> None:
    with pytest.raises(KeyConfigError, match="32 bytes"):
        SigningKey.hs256(SECRET[:31])


def test_the_jwks_of_an_hs256_ring_is_empty() -> None:
    assert json.loads(service_with(KeyRing(SigningKey.hs256(SECRET))).jwks_json()) == {"keys": []}


def test_the_hs256_secret_never_appears_in_the_jwks_or_a_repr() -> None:
    key = SigningKey.hs256(SECRET)
    ring = KeyRing(key)
    assert SECRET.decode() not in service_with(ring).jwks_json()
    assert SECRET.decode() not in repr(key)


def test_a_token_of_another_hs256_secret_under_our_kid_is_invalid() -> None:
    ours = KeyRing(SigningKey.hs256(SECRET))
    theirs = SigningKey.hs256(b"another secret of at least 32 bytes!")
    forged = jwt.decode(token_of(ours), options={"verify_signature": False})
    headers = {"kid": ours.signing_key.kid, "typ": "at+jwt"}
    token = jwt.encode(forged, theirs.private_key, algorithm=HS256, headers=headers)
    with pytest.raises(TokenInvalid):
        service_with(ours).verify_access_token(token)


def test_an_hs256_ring_still_verifies_and_publishes_an_old_ed25519_key() -> None:
    old = SigningKey.ed25519(Ed25519PrivateKey.generate())
    old_token = token_of(KeyRing(old))
    ring = KeyRing(SigningKey.hs256(SECRET), [old.verification])
    assert service_with(ring).verify_access_token(old_token).subject
    assert [k["kid"] for k in json.loads(service_with(ring).jwks_json())["keys"]] == [old.kid]


def test_an_hs256_token_under_an_ed25519_kid_is_invalid() -> None:
    # alg confusion: the token names our Ed25519 key but claims HS256,
    # keyed with that key's public bytes.
    ed = SigningKey.ed25519(Ed25519PrivateKey.generate())
    ring = KeyRing(SigningKey.hs256(SECRET), [ed.verification])
    claims = jwt.decode(token_of(ring), options={"verify_signature": False})
    raw = ed.private_key.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    token = jwt.encode(claims, raw * 2, algorithm=HS256, headers={"kid": ed.kid, "typ": "at+jwt"})
    with pytest.raises(TokenInvalid):
        service_with(ring).verify_access_token(token)


# -- loading from settings ---------------------------------------------------------------------


def test_settings_with_hs256_load_a_ring_that_signs_with_the_secret(tmp_path: Path) -> None:
    settings = Settings(jwt_algorithm=HS256, jwt_hs256_secret=SECRET.decode(), data_dir=tmp_path)
    ring = load_key_ring(settings, LOGGER)
    assert ring.signing_key.kid == SigningKey.hs256(SECRET).kid
    assert not (tmp_path / "jwt-ed25519.pem").exists()


def test_verification_key_files_hold_public_or_private_keys(tmp_path: Path) -> None:
    signing, older, oldest = (Ed25519PrivateKey.generate() for _ in range(3))
    settings = Settings(
        jwt_private_key_pem=private_pem(signing).decode(),
        jwt_verification_key_files=(
            write(tmp_path / "older.pem", private_pem(older)),
            write(tmp_path / "oldest.pub.pem", public_pem(oldest)),
        ),
        data_dir=tmp_path,
    )
    ring = load_key_ring(settings, LOGGER)
    kids = [SigningKey.ed25519(k).kid for k in (signing, older, oldest)]
    assert ring.signing_key.kid == kids[0]
    published = json.loads(service_with(ring).jwks_json())["keys"]
    assert [key["kid"] for key in published] == kids


def test_a_token_of_a_key_in_a_verification_file_verifies(tmp_path: Path) -> None:
    old = Ed25519PrivateKey.generate()
    old_token = token_of(KeyRing(SigningKey.ed25519(old)))
    settings = Settings(
        jwt_private_key_pem=private_pem(Ed25519PrivateKey.generate()).decode(),
        jwt_verification_key_files=(write(tmp_path / "old.pub.pem", public_pem(old)),),
        data_dir=tmp_path,
    )
    assert service_with(load_key_ring(settings, LOGGER)).verify_access_token(old_token).subject


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (public_pem(ec.generate_private_key(ec.SECP256R1())), "key type EC"),
        (private_pem(ec.generate_private_key(ec.SECP256R1())), "key type EC"),
        (b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "not a PEM"),
        (b"hello", "not a PEM"),
    ],
)
def test_an_unusable_verification_key_file_is_refused_by_name(
    tmp_path: Path, data: bytes, message: str
) -> None:
    path = write(tmp_path / "bad.pem", data)
    settings = Settings(jwt_verification_key_files=(path,), data_dir=tmp_path)
    with pytest.raises(KeyConfigError, match=message) as info:
        load_key_ring(settings, LOGGER)
    assert str(path) in str(info.value)


def test_a_missing_verification_key_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(jwt_verification_key_files=(tmp_path / "gone.pem",), data_dir=tmp_path)
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_key_ring(settings, LOGGER)


# -- generate_key_file --------------------------------------------------------------------------


def test_a_generated_key_file_is_private_and_named_by_the_printed_kid(tmp_path: Path) -> None:
    path = tmp_path / "new.pem"
    kid = generate_key_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    assert SigningKey.ed25519(key).kid == kid


def test_generating_over_an_existing_file_is_refused_and_keeps_it(tmp_path: Path) -> None:
    path = write(tmp_path / "existing.pem", b"precious")
    with pytest.raises(FileExistsError):
        generate_key_file(path)
    assert path.read_bytes() == b"precious"
    assert os.listdir(tmp_path) == ["existing.pem"]


def test_two_generated_keys_differ(tmp_path: Path) -> None:
    assert generate_key_file(tmp_path / "a.pem") != generate_key_file(tmp_path / "b.pem")


# -- the cache when the ring changes ------------------------------------------------------------


def test_a_cached_token_of_a_removed_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    old = SigningKey.ed25519(Ed25519PrivateKey.generate())
    new = SigningKey.ed25519(Ed25519PrivateKey.generate())
    service = service_with(KeyRing(new, [old.verification]))
    old_token = token_of(KeyRing(old))
    assert service.verify_access_token(old_token).subject  # now cached
    service.replace_key_ring(KeyRing(new))
    with pytest.raises(TokenInvalid):
        service.verify_access_token(old_token)


def test_a_cached_token_of_a_kept_key_is_not_verified_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    old = SigningKey.ed25519(Ed25519PrivateKey.generate())
    new = SigningKey.ed25519(Ed25519PrivateKey.generate())
    service = service_with(KeyRing(old))
    token = token_of(KeyRing(old))
    service.verify_access_token(token)
    counter = DecodeCounter(monkeypatch)
    service.replace_key_ring(KeyRing(new, [old.verification]))
    assert service.verify_access_token(token).subject
    assert counter.calls == 0


def test_after_a_replacement_new_tokens_carry_the_new_signing_kid() -> None:
    old = SigningKey.ed25519(Ed25519PrivateKey.generate())
    new = SigningKey.ed25519(Ed25519PrivateKey.generate())
    service = service_with(KeyRing(old))
    service.replace_key_ring(KeyRing(new, [old.verification]))
    token, _ = service.issue_access_token(a_user(), session_id="s-2")
    assert jwt.get_unverified_header(token)["kid"] == new.kid
    assert service.key_ring.kids == {old.kid, new.kid}


# -- page-token keys -------------------------------------------------------------------


def test_page_token_keys_come_from_the_signing_key_and_not_its_bytes() -> None:
    key = Ed25519PrivateKey.generate()
    ring = KeyRing(SigningKey.ed25519(key))
    again = KeyRing(SigningKey.ed25519(key))
    (page_key,) = ring.page_token_keys
    assert again.page_token_keys == (page_key,)
    assert page_key != key.private_bytes_raw()
    assert KeyRing(SigningKey.ed25519(Ed25519PrivateKey.generate())).page_token_keys != (page_key,)


def test_a_previous_private_key_listed_for_verification_keeps_its_page_token_key(
    tmp_path: Path,
) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    before = load_key_ring(
        Settings(jwt_private_key_pem=private_pem(old).decode(), data_dir=tmp_path), LOGGER
    )
    during = load_key_ring(
        Settings(
            jwt_private_key_pem=private_pem(new).decode(),
            jwt_verification_key_files=(write(tmp_path / "old.pem", private_pem(old)),),
            data_dir=tmp_path,
        ),
        LOGGER,
    )
    assert len(during.page_token_keys) == 2
    assert during.page_token_keys[1] == before.page_token_keys[0]
    assert during.page_token_keys[0] != before.page_token_keys[0]
