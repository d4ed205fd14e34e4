"""Token signing keys on disk and in settings: reading the configured keys,
the development key made once under the data directory, and new key files
(``usersvc keys generate``). What a key is and how tokens use it lives in
usersvc/services/tokens.py; this module only turns files and settings into
key objects, and checks them."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from usersvc.config import Settings
from usersvc.domain.keys import KeyConfigError, ed25519_jwk, jwk_thumbprint

HS256 = "HS256"
DEV_KEY_FILENAME = "jwt-ed25519.pem"

LoggerLike = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True)
class KeyMaterial:
    """The configured keys: the signing key (an Ed25519 private key, or the
    HS256 secret as bytes) and the keys that only verify."""

    signing: Ed25519PrivateKey | bytes = field(repr=False)
    verification: tuple[Ed25519PublicKey, ...] = ()
    # Raw private keys among the verification files (previous signing keys
    # kept as they were): their page tokens stay valid during a rotation.
    retired_secrets: tuple[bytes, ...] = field(default=(), repr=False)


def read_key_material(settings: Settings, logger: LoggerLike) -> KeyMaterial:
    """The keys named by settings. The signing key is the HS256 secret when
    ``jwt_algorithm`` is HS256, else the Ed25519 PKCS#8 PEM in
    ``jwt_private_key_pem`` or ``jwt_private_key_file`` (in development,
    without either, a key generated once under ``data_dir`` and reused). Every
    file of ``jwt_verification_key_files`` adds a key that only verifies.

    Raises KeyConfigError for an unreadable, encrypted or non-Ed25519 key, a
    missing HS256 secret, and when production has no key configured.
    """
    loaded = [_load_verification_key(path) for path in settings.jwt_verification_key_files]
    verification = tuple(public for public, _ in loaded)
    retired = tuple(private.private_bytes_raw() for _, private in loaded if private is not None)
    if settings.jwt_algorithm == HS256:
        if settings.jwt_hs256_secret is None:
            raise KeyConfigError("USERSVC_JWT_ALGORITHM=HS256 requires USERSVC_JWT_HS256_SECRET")
        return KeyMaterial(settings.jwt_hs256_secret.encode("utf-8"), verification, retired)
    return KeyMaterial(_load_ed25519_signing_key(settings, logger), verification, retired)


def key_file_mode_problems(settings: Settings) -> list[str]:
    """The configured files holding a private key (the JWT signing key, old
    signing keys kept for verification, the TLS key) that group or others
    may read, write or run, each named with its mode. A file that cannot be
    read is left to the loaders, which name it. Raises nothing."""
    candidates = [("USERSVC_JWT_PRIVATE_KEY_FILE", settings.jwt_private_key_file)]
    candidates += [
        ("USERSVC_JWT_VERIFICATION_KEY_FILES", path)
        for path in settings.jwt_verification_key_files
        if _holds_private_key(path)
    ]
    candidates.append(("USERSVC_TLS_KEY_FILE", settings.tls_key_file))
    if not settings.is_production and settings.jwt_private_key_file is None:
        candidates.append(("the development key", settings.data_dir / DEV_KEY_FILENAME))
    problems = []
    for source, path in candidates:
        if path is None:
            continue
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & 0o077:
            problems.append(
                f"{source}: {path} has mode {mode:04o}, so group or others may access "
                "the private key; make it readable by the service's user only "
                f"(chmod 600 {path})"
            )
    return problems


def check_key_file_modes(settings: Settings, logger: LoggerLike) -> list[str]:
    """key_file_mode_problems as start-up problems in production; in
    development each is logged as a warning instead and none is returned.
    Raises nothing."""
    problems = key_file_mode_problems(settings)
    if settings.is_production:
        return problems
    for problem in problems:
        logger.warning("%s (refused in production)", problem)
    return []


def _holds_private_key(path: Path) -> bool:
    try:
        return b"PRIVATE KEY-----" in path.read_bytes()
    except OSError:
        return False


def _load_ed25519_signing_key(settings: Settings, logger: LoggerLike) -> Ed25519PrivateKey:
    if settings.jwt_private_key_pem:
        pem = settings.jwt_private_key_pem
        # A PEM squeezed into one environment line often arrives with
        # literal "\n" sequences instead of line breaks.
        if "\n" not in pem and "\\n" in pem:
            pem = pem.replace("\\n", "\n")
        key = _parse_ed25519_pem(pem.encode("utf-8"), "USERSVC_JWT_PRIVATE_KEY")
    elif settings.jwt_private_key_file is not None:
        path = settings.jwt_private_key_file
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyConfigError(
                f"USERSVC_JWT_PRIVATE_KEY_FILE: cannot read {path}: {exc.strerror}"
            ) from None
        key = _parse_ed25519_pem(data, f"USERSVC_JWT_PRIVATE_KEY_FILE ({path})")
    elif settings.is_production:
        raise KeyConfigError(
            "production requires USERSVC_JWT_PRIVATE_KEY or USERSVC_JWT_PRIVATE_KEY_FILE"
        )
    else:
        key = _development_key(settings.data_dir / DEV_KEY_FILENAME, logger)
    return key


def _load_verification_key(path: Path) -> tuple[Ed25519PublicKey, Ed25519PrivateKey | None]:
    """A verification key from a PEM file holding an Ed25519 public key
    (``openssl pkey -pubout``) or private key (the previous signing key
    file, unchanged; then returned too)."""
    source = f"USERSVC_JWT_VERIFICATION_KEY_FILES ({path})"
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyConfigError(f"{source}: cannot read the file: {exc.strerror}") from None
    if b"PUBLIC KEY-----" not in data:
        private_key = _parse_ed25519_pem(data, source)
        return private_key.public_key(), private_key
    try:
        public_key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyConfigError(f"{source}: not a PEM public or private key") from None
    if not isinstance(public_key, Ed25519PublicKey):
        kind = type(public_key).__name__.removesuffix("PublicKey") or "unknown"
        raise KeyConfigError(f"{source}: key type {kind}, but usersvc verifies Ed25519 (EdDSA)")
    return public_key, None


def generate_key_file(path: Path) -> str:
    """Write a new Ed25519 private key (PKCS#8 PEM, mode 0600) to ``path``
    and return its kid.

    Raises FileExistsError when ``path`` exists (a key is never overwritten:
    tokens signed by it would stop verifying), OSError when it cannot be
    written.
    """
    key = Ed25519PrivateKey.generate()
    _write_new_key_file(path, key)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return jwk_thumbprint(ed25519_jwk(raw))


def _write_new_key_file(path: Path, key: Ed25519PrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Written to a private (0600) temporary file, then linked into place:
    # the key is never readable by others, a reader never sees half of it,
    # and the link fails rather than replace a file that is already there.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".jwt-key-")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(pem)
        os.link(tmp_name, path)
    finally:
        os.unlink(tmp_name)


def _parse_ed25519_pem(pem: bytes, source: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        raise KeyConfigError(
            f"{source}: the key is encrypted; provide an unencrypted PKCS#8 PEM"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyConfigError(
            f"{source}: not a PEM private key (expected '-----BEGIN PRIVATE KEY-----'; "
            "create one with: openssl genpkey -algorithm ed25519)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        kind = type(key).__name__.removesuffix("PrivateKey") or "unknown"
        raise KeyConfigError(
            f"{source}: key type {kind}, but usersvc signs tokens with Ed25519 (EdDSA): "
            "create one with: openssl genpkey -algorithm ed25519"
        )
    return key


def _development_key(path: Path, logger: LoggerLike) -> Ed25519PrivateKey:
    """The key stored at ``path``, created (mode 0600) on first use. Tokens
    then survive restarts, which a key made fresh at every start would not."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = _create_development_key(path)
        logger.warning(
            "generated a development JWT signing key at %s; "
            "set USERSVC_JWT_PRIVATE_KEY_FILE for any real deployment",
            path,
        )
        return key
    except OSError as exc:
        raise KeyConfigError(f"cannot read the development key {path}: {exc.strerror}") from None
    logger.warning(
        "using the development JWT signing key at %s; "
        "set USERSVC_JWT_PRIVATE_KEY_FILE for any real deployment",
        path,
    )
    return _parse_ed25519_pem(data, str(path))


def _create_development_key(path: Path) -> Ed25519PrivateKey:
    key = Ed25519PrivateKey.generate()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            _write_new_key_file(path, key)
        except FileExistsError:
            # A second process starting at the same moment won the link.
            return _parse_ed25519_pem(path.read_bytes(), str(path))
    except OSError as exc:
        raise KeyConfigError(f"cannot write the development key {path}: {exc.strerror}") from None
    return key
