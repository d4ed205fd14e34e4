"""The grpc.aio server: binds the ports (TLS and mTLS as usersvc/bootstrap.py
built them), serves UserService, AuthService and EventService through the
interceptor chain built there, plus health and reflection; a graceful stop on
SIGTERM/SIGINT (NOT_SERVING, the drain, then GOAWAY and the grace period for
the calls in flight), and a reload of the token keys on SIGHUP. It builds
nothing of its own."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from usersvc_protos.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    event_service_pb2,
    event_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.adapters.db_monitor import DatabaseMonitor
from usersvc.adapters.tls import client_certificate_mode
from usersvc.api.health import HealthReporter
from usersvc.bootstrap import Container, load_key_ring
from usersvc.config import Settings
from usersvc.domain.keys import KeyConfigError

logger = logging.getLogger("usersvc.server")

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
AUTH_SERVICE = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
EVENT_SERVICE = event_service_pb2.DESCRIPTOR.services_by_name["EventService"].full_name
# What the server registers (usersvc.v1); health reports each of them, and
# "" for the whole server.
SERVICES = (USER_SERVICE, AUTH_SERVICE, EVENT_SERVICE)
HEALTH_SERVICES = ("", *SERVICES)


def _bind(server: grpc.aio.Server, addr: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            return server.add_insecure_port(addr)
        return server.add_secure_port(addr, credentials)
    except RuntimeError as exc:
        raise RuntimeError(f"cannot listen on {addr}: address in use or invalid") from exc


class _GenericHandlersOnly:
    """Stands in for the server when the generated ``add_*Servicer_to_server``
    functions register usersvc's services: they register each service twice,
    as a generic handler and as registered methods, and keeps the generic
    handler only.

    Why: grpc.aio's server keeps one pending request per registered method
    and waits on all of them (``asyncio.wait``) for every call it accepts;
    with usersvc's 28 methods that wait cost a GetUser about 10 us of CPU
    (docs/performance.md). A generic handler is one pending request, and
    calls reach the same handlers by method name. Health and reflection
    (grpc's code) keep their three registered methods.
    """

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, handlers: Sequence[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Any]) -> None:
        """Left out (see the class docstring)."""


def _ms(seconds: float) -> int:
    # gRPC reads 0 as "at once"; its "never" is INT_MAX.
    return round(seconds * 1000) if seconds > 0 else _GRPC_NEVER


_GRPC_NEVER = 2**31 - 1


def server_options(settings: Settings, *, reuse_port: bool = False) -> list[tuple[str, int]]:
    """The grpc channel arguments of the server: message and metadata size,
    per-connection call limit, keepalive enforcement, connection idle and age
    limits (docs/operations.md, "Connection limits"). Raises nothing."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        # Without this a second server on the same port would bind
        # silently and share its traffic (grpc enables SO_REUSEPORT).
        # Workers share it on purpose; their supervisor checked that
        # nobody else holds the port before starting them.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_concurrent_streams", settings.max_streams_per_connection),
        # Both limits alike: between a soft and a hard limit gRPC refuses
        # headers at random, so 9 KB passed most of the time.
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", settings.max_metadata_bytes),
        ("grpc.keepalive_permit_without_calls", int(settings.keepalive_permit_without_calls)),
        ("grpc.http2.min_ping_interval_without_data_ms", settings.keepalive_min_ping_interval_ms),
        ("grpc.http2.max_ping_strikes", settings.keepalive_max_ping_strikes),
        ("grpc.max_connection_idle_ms", _ms(settings.max_connection_idle_seconds)),
        ("grpc.max_connection_age_ms", _ms(settings.max_connection_age_seconds)),
        (
            "grpc.max_connection_age_grace_ms",
            round(settings.max_connection_age_grace_seconds * 1000),
        ),
    ]


class UsersvcServer:
    """A started server. Use ``start`` to build one and ``stop`` to drain it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        health_servicer: HealthReporter,
        port: int,
        mtls_port: int | None = None,
        monitor: DatabaseMonitor | None = None,
    ):
        self._server = server
        self._health = health_servicer
        self._monitor = monitor
        # Called when the stop begins (ends the event streams).
        self.on_stop: Callable[[], None] | None = None
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
        RuntimeError when an address is taken, ValueError for a container
        built with serving=False."""
        settings = container.settings
        addr = listen_addr or settings.listen_addr
        serving = container.serving
        if serving is None:
            raise ValueError("this container was built with serving=False")
        credentials = serving.credentials
        # Computed now, so the first login for an unknown email takes as long
        # as any other failed login (no timing oracle on a cold start).
        await container.hasher.dummy_hash()
        # The revocation cache is loaded before the first call is served.
        await container.start_background()
        server = grpc.aio.server(
            interceptors=serving.interceptors,
            options=server_options(settings, reuse_port=reuse_port),
            # No maximum_concurrent_rpcs: grpc counts a call from its headers,
            # so calls whose body never arrives would fill it. The admission
            # interceptor (usersvc/api/interceptors/admission.py) caps calls
            # once their request has arrived, per kind, instead.
        )
        generic = cast(grpc.aio.Server, _GenericHandlersOnly(server))
        user_service_pb2_grpc.add_UserServiceServicer_to_server(serving.user_servicer, generic)
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(serving.auth_servicer, generic)
        event_service_pb2_grpc.add_EventServiceServicer_to_server(serving.event_servicer, generic)
        health_servicer = HealthReporter()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        port = _bind(server, addr, credentials.main)
        mtls_port = None
        if credentials.mtls is not None and settings.mtls_listen_addr is not None:
            mtls_port = _bind(server, settings.mtls_listen_addr, credentials.mtls)
        await server.start()
        started = cls(server, health_servicer, port, mtls_port, container.database_monitor)
        # WatchEvents streams never end by themselves: a stop ends them.
        started.on_stop = None if container.events is None else container.events.feed.close
        await started._follow_database()
        logger.info(
            "serving",
            extra={
                "addr": addr,
                "port": port,
                "tls": credentials.main is not None,
                "client_certificates": client_certificate_mode(settings),
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
        for name in HEALTH_SERVICES:
            await self._health.set(name, serving)

    async def stop(
        self, grace: float, *, drain: float = 0.0, hurry: asyncio.Event | None = None
    ) -> None:
        """Report NOT_SERVING for every service at once; keep serving new
        calls for ``drain`` seconds (cut short when ``hurry`` is set), so
        that balancers and health-checking clients move away first; then
        refuse new calls (GOAWAY), let in-flight calls finish within
        ``grace`` seconds, and cancel what is left. Raises nothing.

        Why the drain matters: grpc core, when the stop begins, drops the
        calls it has received but not yet handed to the service, and those
        whose headers arrive before the client has read the GOAWAY; their
        callers see CANCELLED (grpc/grpc#41785, docs/operations.md). With no
        calls arriving any more when the stop begins, there are none."""
        self._stopping = True
        if self._monitor is not None:
            self._monitor.remove_listener(self._database_changed)
        await self._set_health(False)
        if drain > 0:
            logger.info("draining", extra={"drain_seconds": drain})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((hurry or asyncio.Event()).wait(), drain)
        # Long-lived streams (WatchEvents) end once the drain is over.
        if self.on_stop is not None:
            self.on_stop()
        # Health Watch streams would otherwise hold the stop for the whole
        # grace period. Closed now, they end after the server has begun to
        # refuse new calls (stop() below starts that before it first waits),
        # so a client's fresh Watch cannot slip in as a new call in flight.
        await self._health.close()
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


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
    # A second SIGTERM/SIGINT cuts the drain short.
    hurry = asyncio.Event()

    def on_stop_signal() -> None:
        (hurry if stop.is_set() else stop).set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop_signal)
    loop.add_signal_handler(signal.SIGHUP, reload_keys, container)
    if parent_fd is not None:
        loop.add_reader(parent_fd, _parent_gone, parent_fd, stop)
    try:
        await stop.wait()
        grace = container.settings.shutdown_grace_seconds
        drain = container.settings.shutdown_drain_seconds
        logger.info("stopping", extra={"grace_seconds": grace, "drain_seconds": drain})
        await server.stop(grace, drain=drain, hurry=hurry)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if parent_fd is not None:
            loop.remove_reader(parent_fd)
        await container.aclose()
        logger.info("stopped")
