"""TLS to PostgreSQL, configured in the URL, through create_engine.

A private PostgreSQL cluster (tests/clusters.py) is started for these tests
with ssl=on, a self-signed certificate made here, and a pg_hba.conf that
accepts TCP connections only over TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from clusters import private_cluster
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


@pytest.fixture(scope="module")
def tls_server() -> Iterator[TlsServer]:
    # Under /tmp rather than pytest's tmp_path, which other users cannot enter.
    base = Path(tempfile.mkdtemp(prefix="usersvc-tls-"))
    cert_file, key_file = write_self_signed_certificate(base)
    with private_cluster(
        require_tls=True,
        base=base,
        owned_files=(cert_file, key_file),
        settings={
            "ssl": "on",
            "ssl_cert_file": f"'{cert_file}'",
            "ssl_key_file": f"'{key_file}'",
        },
        # The Unix socket serves pg_ctl's readiness check; TCP only with TLS.
        hba="local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
    ) as cluster:
        yield TlsServer(cluster.url, cert_file)


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
