"""The grpc.aio server: UserService, AuthService, health, reflection,
interceptors, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from generated.usersvc.v1 import (
    auth_service_pb2,
    auth_service_pb2_grpc,
    user_service_pb2,
    user_service_pb2_grpc,
)
from usersvc.api.auth_servicer import AuthServicer
from usersvc.api.interceptors import build_interceptors
from usersvc.api.public import PublicMethods
from usersvc.api.user_servicer import UserServicer
from usersvc.bootstrap import Container

logger = logging.getLogger("usersvc.server")

USER_SERVICE = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
AUTH_SERVICE = auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
HEALTH_SERVICES = ("", USER_SERVICE, AUTH_SERVICE)


class UsersvcServer:
    """A started server. Use ``start`` to build one and ``stop`` to drain it."""

    # grpc_health's aio servicer has no type stubs; its set() is a coroutine.
    def __init__(self, server: grpc.aio.Server, health_servicer: Any, port: int):
        self._server = server
        self._health = health_servicer
        self.port = port

    @classmethod
    async def start(cls, container: Container, *, listen_addr: str | None = None) -> UsersvcServer:
        """Bind and start serving. Raises RuntimeError when the address is taken."""
        settings = container.settings
        addr = listen_addr or settings.listen_addr
        # Computed now, so the first login for an unknown email takes as long
        # as any other failed login (no timing oracle on a cold start).
        await container.hasher.dummy_hash()
        server = grpc.aio.server(
            interceptors=build_interceptors(
                auth_service=container.auth_service,
                public_methods=PublicMethods(allow_signup=settings.allow_signup),
            ),
            options=[
                ("grpc.max_receive_message_length", settings.max_message_bytes),
                # Without this a second server on the same port would bind
                # silently and share its traffic (grpc enables SO_REUSEPORT).
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ],
        )
        user_service_pb2_grpc.add_UserServiceServicer_to_server(
            UserServicer(container.user_service), server
        )
        auth_service_pb2_grpc.add_AuthServiceServicer_to_server(
            AuthServicer(container.auth_service), server
        )
        health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (USER_SERVICE, AUTH_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            port = server.add_insecure_port(addr)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot listen on {addr}: address in use or invalid") from exc
        await server.start()
        for name in HEALTH_SERVICES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving", extra={"addr": addr, "port": port})
        return cls(server, health_servicer, port)

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, refuse new calls, let in-flight calls finish
        within ``grace`` seconds, then cancel what is left."""
        for name in HEALTH_SERVICES:
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def run_until_signalled(container: Container) -> None:
    """Serve until SIGTERM or SIGINT, then drain and release everything."""
    server = await UsersvcServer.start(container)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        grace = container.settings.shutdown_grace_seconds
        logger.info("stopping", extra={"grace_seconds": grace})
        await server.stop(grace)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await container.aclose()
        logger.info("stopped")
