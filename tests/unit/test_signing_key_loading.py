"""Where the token signing key comes from (usersvc.adapters.keys, read
through usersvc.bootstrap.load_key_ring).

These tests touch only pytest's tmp_path."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from usersvc.adapters.keys import DEV_KEY_FILENAME
from usersvc.bootstrap import load_key_ring
from usersvc.config import Settings
from usersvc.domain.keys import KeyConfigError
from usersvc.services.tokens import SigningKey

LOGGER = logging.getLogger("tests.signing_keys")


def pem_of(key: object, password: bytes | None = None) -> str:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    ).decode()


def test_an_inline_pem_key_signs(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    ring = load_key_ring(Settings(jwt_private_key_pem=pem_of(key), data_dir=tmp_path), LOGGER)
    assert ring.signing_key.kid == SigningKey.ed25519(key).kid
    assert not (tmp_path / DEV_KEY_FILENAME).exists()


def test_an_inline_pem_with_escaped_newlines_is_accepted(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    one_line = pem_of(key).replace("\n", "\\n")
    ring = load_key_ring(Settings(jwt_private_key_pem=one_line, data_dir=tmp_path), LOGGER)
    assert ring.signing_key.kid == SigningKey.ed25519(key).kid


def test_a_key_file_signs(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    path = tmp_path / "signing.pem"
    path.write_text(pem_of(key))
    ring = load_key_ring(Settings(jwt_private_key_file=path, data_dir=tmp_path), LOGGER)
    assert ring.signing_key.kid == SigningKey.ed25519(key).kid


def test_a_missing_key_file_is_a_clear_error(tmp_path: Path) -> None:
    settings = Settings(jwt_private_key_file=tmp_path / "absent.pem", data_dir=tmp_path)
    with pytest.raises(KeyConfigError, match="cannot read"):
        load_key_ring(settings, LOGGER)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RSA"),
        (ec.generate_private_key(ec.SECP256R1()), "EC"),
    ],
)
def test_a_key_of_another_type_is_refused_by_name(tmp_path: Path, key: object, kind: str) -> None:
    settings = Settings(jwt_private_key_pem=pem_of(key), data_dir=tmp_path)
    with pytest.raises(KeyConfigError, match=f"key type {kind}, .*Ed25519"):
        load_key_ring(settings, LOGGER)


def test_an_encrypted_key_is_refused(tmp_path: Path) -> None:
    pem = pem_of(Ed25519PrivateKey.generate(), password=b"secret")
    with pytest.raises(KeyConfigError, match="encrypted"):
        load_key_ring(Settings(jwt_private_key_pem=pem, data_dir=tmp_path), LOGGER)


def test_text_that_is_not_a_pem_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyConfigError, match="not a PEM private key"):
        load_key_ring(Settings(jwt_private_key_pem="hello", data_dir=tmp_path), LOGGER)


def test_development_generates_a_private_key_file_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        ring = load_key_ring(Settings(data_dir=data_dir), LOGGER)
    path = data_dir / DEV_KEY_FILENAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "generated a development JWT signing key" in caplog.text
    assert ring.signing_key.kid


def test_development_reuses_its_key_after_a_restart(tmp_path: Path) -> None:
    first = load_key_ring(Settings(data_dir=tmp_path), LOGGER)
    second = load_key_ring(Settings(data_dir=tmp_path), LOGGER)
    assert first.signing_key.kid == second.signing_key.kid


def test_reusing_the_development_key_still_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_key_ring(Settings(data_dir=tmp_path), LOGGER)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER.name):
        load_key_ring(Settings(data_dir=tmp_path), LOGGER)
    assert "development JWT signing key" in caplog.text


def test_a_corrupt_development_key_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DEV_KEY_FILENAME).write_text("garbage")
    with pytest.raises(KeyConfigError, match="not a PEM private key"):
        load_key_ring(Settings(data_dir=tmp_path), LOGGER)


def test_production_without_a_key_is_refused(tmp_path: Path) -> None:
    settings = Settings(environment="production", data_dir=tmp_path)
    with pytest.raises(KeyConfigError, match="production"):
        load_key_ring(settings, LOGGER)
    assert not (tmp_path / DEV_KEY_FILENAME).exists()
