"""Fixtures of the API layer's unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest_asyncio

from usersvc_protos.v1 import auth_service_pb2_grpc, user_service_pb2_grpc

from .support import FakeAuthService, RunningServer, start_server


@pytest_asyncio.fixture
async def served() -> AsyncIterator[RunningServer]:
    auth = FakeAuthService()
    server, port, users = await start_server(auth)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield RunningServer(
            channel=channel,
            users=users,
            auth=auth,
            user_stub=user_service_pb2_grpc.UserServiceStub(channel),
            auth_stub=auth_service_pb2_grpc.AuthServiceStub(channel),
        )
    await server.stop(None)
