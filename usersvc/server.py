"""The grpc.aio server: UserService, AuthService, health, reflection,
interceptors, TLS and mTLS, a graceful stop on SIGTERM/SIGINT, and a reload of
the token keys on SIGHUP."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.adapters.db_monitor import DatabaseMonitor
from usersvc.api.auth_servicer import AuthServicer
from usersvc.api.interceptors import build_interceptors
from usersvc.api.public import PublicMethods
from usersvc.api.user_servicer import UserServicer
from usersvc.bootstrap import Container
from usersvc.config import Settings
from usersvc.domain.rate_limits import rate_or_none
from usersvc.services.tokens import KeyConfigError, load_key_ring

logger = logging.getLogger("usersvc.server")

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
AUTH_SERVICE = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
HEALTH_SERVICES = ("", USER_SERVICE, AUTH_SERVICE)


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


def _bind(server: grpc.aio.Server, addr: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(addr)
        return server.add_secure_port(addr, credentials)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {addr}: address in use or invalid") from exc


class UsersvcServer:
    """A started server. Use ``start`` to build one and ``stop`` to drain it."""

    # grpc_health's aio servicer has no type stubs; its set() is a coroutine.
    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: Any,
        port: int,
        mtls_port: int | None = None,
        monitor: DatabaseMonitor | None = None,
    ):
        self._server = server
        self._health = health_servicer
        self._monitor = monitor
        self._stopping = False
        self.port = port
        # The port that requires client certificates, when it is a second one.
        self.mtls_port = mtls_port

    @classmethod
    async def start(
        cls, container: Container, *, listen_addr: str | None = None, reuse_port: bool = False
    ) -> UsersvcServer:
        """Bind and start serving; ``reuse_port`` lets the workers of one
        supervisor (usersvc.supervisor) share the port(s). Raises
        RuntimeError when an address is taken, TlsConfigError (a
        RuntimeError) for unusable TLS files."""
        settings = container.settings
        addr = listen_addr or settings.listen_addr
        credentials = load_server_credentials(settings)
        # Computed now, so the first login for an unknown email takes as long
        # as any other failed login (no timing oracle on a cold start).
        await container.hasher.dummy_hash()
        # The revocation cache is loaded before the first call is served.
        await container.start_background()
        server = grpc.aio.server(
            interceptors=build_interceptors(
                auth_service=container.auth_service,
                public_methods=PublicMethods(allow_signup=settings.allow_signup),
                service_identities=settings.service_identities,
                deadline_margin_seconds=settings.deadline_margin_ms / 1000,
                ensure_database=(
                    None
                    if container.database_monitor is None
                    else container.database_monitor.ensure_available
                ),
                rate_limiter=container.rate_limiter,
                general_rate=rate_or_none(settings.rate_limit_rps, settings.rate_limit_burst),
                auth_rate=rate_or_none(
                    settings.auth_rate_limit_rps, settings.auth_rate_limit_burst
                ),
                trusted_proxies=settings.trusted_proxies,
                call_metrics=None if container.metrics is None else container.metrics.calls,
                on_rate_limited=(
                    None if container.metrics is None else container.metrics.rate_limited
                ),
                tracing=None if container.tracing is None else container.tracing.interceptor(),
            ),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                # Without this a second server on the same port would bind
                # silently and share its traffic (grpc enables SO_REUSEPORT).
                # Workers share it on purpose; their supervisor checked that
                # nobody else holds the port before starting them.
                ("grpc.so_reuseport", 1 if reuse_port else 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
            # Beyond this many calls in progress grpc itself answers
            # RESOURCE_EXHAUSTED ("Concurrent RPC limit exceeded!", no
            # ErrorInfo: no interceptor runs), before any work or memory.
            maximum_concurrent_rpcs=settings.max_concurrent_rpcs,
        )
        user_service_pb2_grpc.add_UserServiceServicer_to_server(
            UserServicer(
                container.user_service,
                account_codes=container.account_codes,
                batch_writes=container.batch_writes,
            ),
            server,
        )
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(container.auth_service), server
        )
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (USER_SERVICE, AUTH_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = _bind(server, addr, credentials.main)
        mtls_port = None
        if credentials.mtls is not None and settings.mtls_listen_addr is not None:
            mtls_port = _bind(server, settings.mtls_listen_addr, credentials.mtls)
        await server.start()
        started = cls(server, health_servicer, port, mtls_port, container.database_monitor)
        await started._follow_database()
        logger.info(
            "serving",
            extra={
                "addr": addr,
                "port": port,
                "tls": credentials.main is not None,
                "client_certificates": _client_certificate_mode(settings),
                "mtls_port": mtls_port,
            },
        )
        return started

    async def _follow_database(self) -> None:
        # Health follows the database monitor: NOT_SERVING while the
        # database is down (every call that needs it would fail), SERVING
        # again when it is back, until the stop begins.
        if self._monitor is not None:
            self._monitor.add_listener(self._database_changed)
        await self._set_health(self._monitor is None or self._monitor.available)

    async def _database_changed(self, available: bool) -> None:
        if not self._stopping:
            await self._set_health(available)

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in HEALTH_SERVICES:
            await self._health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish
        within ``grace`` seconds, then cancel what is left."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.remove_listener(self._database_changed)
        await self._set_health(False)
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


def _client_certificate_mode(settings: Settings) -> str:
    if settings.tls_client_ca_file is None:
        return "off"
    return "required on mtls port" if settings.mtls_listen_addr else "required"


def reload_keys(container: Container) -> bool:
    """Read the token keys again (a rotation without a restart: the files
    named by the settings may have new content). On a problem, log it and
    keep the keys in use. Returns whether the keys were replaced. Raises
    nothing."""
    try:
        ring = load_key_ring(container.settings, logger)
    except KeyConfigError as exc:
        logger.error("keeping the current token keys: %s", exc)
        return False
    container.tokens.replace_key_ring(ring)
    logger.info(
        "token keys reloaded",
        extra={"signing_kid": ring.signing_key.kid, "kids": sorted(ring.kids)},
    )
    return True


def _parent_gone(fd: int, stop: asyncio.Event) -> None:
    # The supervisor never writes: readable means end of file (it exited,
    # even by SIGKILL), so nobody would forward a SIGTERM any more.
    try:
        data = os.read(fd, 1)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        asyncio.get_running_loop().remove_reader(fd)
        logger.warning("supervisor gone; stopping")
        stop.set()


async def run_until_signalled(
    container: Container, *, reuse_port: bool = False, parent_fd: int | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and release everything;
    SIGHUP reloads the token keys. A worker passes ``reuse_port`` and
    ``parent_fd``, the read end of a pipe its supervisor holds open: end of
    file there means the supervisor is gone, and the worker stops too."""
    try:
        server = await UsersvcServer.start(container, reuse_port=reuse_port)
    except BaseException:
        # Nothing serves, but the pool and background tasks may be running.
        await container.aclose()
        raise
    # Everything built so far (modules, engine, servicers: ~80,000 objects)
    # lives as long as the process. Frozen, the garbage collector's full
    # passes stop walking it: each took ~50 ms of event loop here, a p99
    # spike every few seconds under load (docs/performance.md).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_keys, container)
    if parent_fd is not None:
        loop.add_reader(parent_fd, _parent_gone, parent_fd, stop)
    try:
        await stop.wait()
        grace = container.settings.shutdown_grace_seconds
        logger.info("stopping", extra={"grace_seconds": grace})
        await server.stop(grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if parent_fd is not None:
            loop.remove_reader(parent_fd)
        await container.aclose()
        logger.info("stopped")
