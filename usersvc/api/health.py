"""``grpc.health.v1.Health`` with an end: the statuses the server reports
(overall ``""`` and one per service), answered by Check and pushed to Watch
streams, and ``close``, which the stop sequence calls.

grpc_health's own aio servicer never ends a Watch stream. Clients that
balance with health checking (gRPC's round_robin with a ``healthCheckConfig``,
Envoy, a mesh) keep one open per connection, so a graceful stop would wait
the whole grace period for them and then cancel them. ``close`` reports
NOT_SERVING for every service, refuses later changes, and finishes every
Watch stream (the last message each one sent says NOT_SERVING)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


# grpc_health ships no type information for its generated servicer.
class HealthReporter(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """The server's health, by service name (``""`` is the whole server)."""

    def __init__(self) -> None:
        self._statuses: dict[str, int] = {"": SERVING}
        # Notified on every change and on close; Watch streams wait on it.
        self._changed = asyncio.Condition()
        self._closed = False

    def status(self, service: str) -> int | None:
        """The status reported for ``service``, None if it is unknown."""
        status: int | None = self._statuses.get(service)
        return status

    def _status_of(self, service: str) -> int:
        status: int = self._statuses.get(service, SERVICE_UNKNOWN)
        return status

    @property
    def closed(self) -> bool:
        return self._closed

    async def set(self, service: str, serving: bool) -> None:
        """Report ``service`` as SERVING or NOT_SERVING; ignored once
        closed. Raises nothing."""
        if self._closed:
            return
        async with self._changed:
            self._statuses[service] = SERVING if serving else NOT_SERVING
            self._changed.notify_all()

    async def close(self) -> None:
        """NOT_SERVING for every service from now on, and every Watch stream
        finishes after sending it. Raises nothing."""
        async with self._changed:
            self._closed = True
            for service in self._statuses:
                self._statuses[service] = NOT_SERVING
            self._changed.notify_all()

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthCheckResponse:
        status = self._statuses.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        sent: int | None = None
        while True:
            async with self._changed:
                while not self._closed and self._status_of(request.service) == sent:
                    await self._changed.wait()
                status = self._status_of(request.service)
                closed = self._closed
            # Written outside the lock: a slow reader holds up nobody else.
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if closed:
                return
