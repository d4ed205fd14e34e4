"""TLS to PostgreSQL, configured in the URL, through create_engine.

A private PostgreSQL cluster is started for these tests with ssl=on, a
self-signed certificate made here, and a pg_hba.conf that accepts TCP
connections only over TLS.
"""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy import text

from usersvc.adapters.database import create_engine
from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.config import Settings
from usersvc.domain.errors import DatabaseUnavailable


@dataclass(frozen=True)
class TlsServer:
    url: str  # postgresql+asyncpg URL without TLS options
    ca_file: Path  # the self-signed server certificate, usable as its own CA


def binaries_with_tls() -> Path | None:
    """A PostgreSQL bin directory built with OpenSSL: pgserver's bundle when
    it has TLS, else the machine's newest /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin")
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    for bin_dir in candidates:
        if not all((bin_dir / name).exists() for name in ("initdb", "pg_ctl", "pg_config")):
            continue
        configure = subprocess.run(
            [str(bin_dir / "pg_config"), "--configure"], capture_output=True, text=True, check=False
        ).stdout
        if "--with-openssl" in configure or "--with-ssl=openssl" in configure:
            return bin_dir
    return None


def server_user() -> str | None:
    """PostgreSQL refuses to run as root: the user to run it as, if any."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgserver"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.skip("running as root and no 'postgres' or 'pgserver' user to run PostgreSQL as")


def write_self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file = directory / "server.crt"
    key_file = directory / "server.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)  # PostgreSQL refuses a key others can read
    return cert_file, key_file


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    bin_dir = binaries_with_tls()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries built with OpenSSL on this machine")
    user = server_user()
    run_as: dict[str, Any] = {} if user is None else {"user": user}

    # Under /tmp rather than pytest's tmp_path, which other users cannot enter.
    base = Path(tempfile.mkdtemp(prefix="usersvc-tls-"))
    data = base / "data"
    port = free_port()
    try:
        cert_file, key_file = write_self_signed_certificate(base)
        if user is not None:
            for path in (base, cert_file, key_file):
                shutil.chown(path, user=user)
        subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--no-sync"],
            check=True, capture_output=True, **run_as,
        )  # fmt: skip
        with (data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\n"
                f"port = {port}\n"
                f"unix_socket_directories = '{base}'\n"
                f"ssl = on\n"
                f"ssl_cert_file = '{cert_file}'\n"
                f"ssl_key_file = '{key_file}'\n"
                f"fsync = off\n"
            )
        # The Unix socket serves pg_ctl's readiness check; TCP only with TLS.
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n"
        )
        subprocess.run(
            [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "30",
             "start"],
            check=True, capture_output=True, **run_as,
        )  # fmt: skip
        try:
            yield TlsServer(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/postgres", cert_file)
        finally:
            subprocess.run(
                [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
                check=False, capture_output=True, **run_as,
            )  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def connection_uses_tls(url: str) -> bool:
    engine = create_engine(Settings(), url)
    try:
        async with engine.connect() as connection:
            result = await connection.execute(
                text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            )
            return bool(result.scalar_one())
    finally:
        await engine.dispose()


async def test_a_url_with_ssl_require_connects_over_tls(tls_server: TlsServer) -> None:
    assert await connection_uses_tls(tls_server.url + "?ssl=require") is True


async def test_a_url_with_libpq_sslmode_and_sslrootcert_verifies_the_server(
    tls_server: TlsServer,
) -> None:
    url = f"{tls_server.url}?sslmode=verify-full&sslrootcert={tls_server.ca_file}"
    assert await connection_uses_tls(url) is True


async def test_verification_against_the_wrong_ca_fails(
    tls_server: TlsServer, tmp_path: Path
) -> None:
    other_ca, _ = write_self_signed_certificate(tmp_path)
    url = f"{tls_server.url}?sslmode=verify-full&sslrootcert={other_ca}"
    engine = create_engine(Settings(), url)
    try:
        async with make_uow_factory(engine)() as uow:
            with pytest.raises(DatabaseUnavailable) as caught:
                await uow.users.get_by_email("anyone@example.com")
    finally:
        await engine.dispose()
    assert "certificate verify failed" in repr(caught.value.__cause__)


async def test_a_connection_without_tls_is_refused(tls_server: TlsServer) -> None:
    engine = create_engine(Settings(), tls_server.url + "?ssl=disable")
    try:
        async with make_uow_factory(engine)() as uow:
            with pytest.raises(DatabaseUnavailable) as caught:
                await uow.users.get_by_email("anyone@example.com")
    finally:
        await engine.dispose()
    assert "no encryption" in str(caught.value.__cause__)
