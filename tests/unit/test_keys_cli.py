"""``usersvc keys generate --out FILE`` (usersvc.cli). Touches only tmp_path."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from usersvc.cli import main
from usersvc.services.tokens import SigningKey


def test_keys_generate_writes_a_private_key_and_prints_its_kid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "jwt.pem"
    assert main(["keys", "generate", "--out", str(path)]) == 0
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    assert capsys.readouterr().out == SigningKey.ed25519(key).kid + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_keys_generate_refuses_to_overwrite_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "jwt.pem"
    path.write_text("the key in use")
    assert main(["keys", "generate", "--out", str(path)]) == 1
    assert path.read_text() == "the key in use"
    assert "not overwriting" in capsys.readouterr().err


def test_keys_generate_into_a_missing_directory_fails_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", "--out", str(tmp_path / "no" / "jwt.pem")]) == 1
    assert "cannot write" in capsys.readouterr().err


def test_keys_generate_needs_no_valid_service_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("USERSVC_DB_POOL_SIZE", "not a number")
    assert main(["keys", "generate", "--out", str(tmp_path / "jwt.pem")]) == 0
