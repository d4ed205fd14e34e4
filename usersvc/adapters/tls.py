"""The TLS credentials of the gRPC ports, from the files the settings name:
each file read and checked at start-up (readable, PEM, the key belongs to
the certificate), so a mistake stops the process with the variable named
instead of failing every handshake later. Also the channel ``usersvc
healthcheck`` dials the server with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from usersvc.config import Settings


class TlsConfigError(RuntimeError):
    """The TLS files cannot be used (raised at start-up)."""


@dataclass(frozen=True)
class ServerCredentials:
    """What each port is bound with: None is plaintext."""

    main: grpc.ServerCredentials | None
    # Set only with USERSVC_MTLS_LISTEN_ADDR.
    mtls: grpc.ServerCredentials | None


def load_server_credentials(settings: Settings) -> ServerCredentials:
    """The credentials of the gRPC ports, from the TLS settings.

    grpc (checked with grpcio 1.85) offers servers two modes only: with
    ``require_client_auth=False`` the handshake does not even ask for a
    client certificate (whatever root certificates are given, no x509
    property ever reaches ``auth_context``), and with True every client must
    present one that the CA verifies. "Optional but verified" does not
    exist, and an unverified identity must never be trusted, so:

    - a client CA and USERSVC_MTLS_LISTEN_ADDR: the main port is TLS without
      client certificates (bearer tokens, as before), the second port
      requires a verified client certificate (services; a bearer token sent
      there still decides who calls);
    - a client CA alone: the one port requires a verified client certificate
      from every caller, bearer-token callers included;
    - no client CA: TLS only; no certificate identities at all.

    Raises TlsConfigError for a file that is unreadable, not PEM, or a key
    that does not belong to the certificate.
    """
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        return ServerCredentials(main=None, mtls=None)
    chain = _read_certificates(settings.tls_cert_file, "USERSVC_TLS_CERT_FILE")
    key = _read_private_key(settings.tls_key_file, chain[0])
    pairs = [(key, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))]
    if settings.tls_client_ca_file is None:
        return ServerCredentials(main=grpc.ssl_server_credentials(pairs), mtls=None)
    client_ca = b"".join(
        c.public_bytes(serialization.Encoding.PEM)
        for c in _read_certificates(settings.tls_client_ca_file, "USERSVC_TLS_CLIENT_CA_FILE")
    )
    required = grpc.ssl_server_credentials(
        pairs, root_certificates=client_ca, require_client_auth=True
    )
    if settings.mtls_listen_addr is None:
        return ServerCredentials(main=required, mtls=None)
    return ServerCredentials(main=grpc.ssl_server_credentials(pairs), mtls=required)


def _read_file(path: Path, variable: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TlsConfigError(f"{variable}: cannot read {path}: {exc.strerror}") from None


def _read_certificates(path: Path, variable: str) -> list[x509.Certificate]:
    try:
        certificates = x509.load_pem_x509_certificates(_read_file(path, variable))
    except ValueError:
        raise TlsConfigError(f"{variable}: {path} holds no PEM certificate") from None
    return certificates


def _read_private_key(path: Path, certificate: x509.Certificate) -> bytes:
    variable = "USERSVC_TLS_KEY_FILE"
    data = _read_file(path, variable)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsConfigError(f"{variable}: {path} is encrypted; provide it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsConfigError(f"{variable}: {path} holds no PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != certificate.public_key().public_bytes(*spki):
        raise TlsConfigError(
            f"{variable}: {path} is not the key of the first certificate in USERSVC_TLS_CERT_FILE"
        )
    return data


def client_certificate_mode(settings: Settings) -> str:
    """How client certificates are asked for, as the start-up log line says
    it. Raises nothing."""
    if settings.tls_client_ca_file is None:
        return "off"
    return "required on mtls port" if settings.mtls_listen_addr else "required"


def probe_channel(
    settings: Settings,
    target: str,
    *,
    ca_file: Path | None = None,
    server_name: str | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> grpc.Channel:
    """A channel to ``target`` (``usersvc healthcheck``): plaintext, or TLS
    when the server has it, trusting ``ca_file`` (default: the server's own
    certificate file) and checking ``server_name`` (default: the first DNS
    name of that certificate); ``client_cert``/``client_key`` for a port
    that requires client certificates. Raises OSError for an unreadable
    file, ValueError for a certificate that is not PEM."""
    if settings.tls_cert_file is None:
        return grpc.insecure_channel(target)
    server_cert = settings.tls_cert_file.read_bytes()
    roots = ca_file.read_bytes() if ca_file else server_cert
    key = client_key.read_bytes() if client_key else None
    chain = client_cert.read_bytes() if client_cert else None
    name = server_name
    if name is None:
        leaf = x509.load_pem_x509_certificate(server_cert)
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = san.get_values_for_type(x509.DNSName)
        except x509.ExtensionNotFound:
            names = []
        name = names[0] if names else None
    # We dial an address; the certificate names a host: check that name.
    options = [("grpc.ssl_target_name_override", name)] if name else []
    credentials = grpc.ssl_channel_credentials(roots, key, chain)
    return grpc.secure_channel(target, credentials, options=options)
