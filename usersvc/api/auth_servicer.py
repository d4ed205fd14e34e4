"""usersvc.v1.AuthService over gRPC: Login and GetJwks.

RefreshToken, Logout, RevokeAllSessions and IntrospectToken are inherited from
the generated base class, which answers UNIMPLEMENTED until they are built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from generated.usersvc.v1 import auth_service_pb2 as pb
from generated.usersvc.v1 import auth_service_pb2_grpc
from usersvc.api import mappers

if TYPE_CHECKING:
    from usersvc.services.auth import AuthService

_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    """Every method raises what the service raises (usersvc.domain.errors)."""

    # The next issue's RPCs, named here so the type checker (which reads the
    # generated stubs' abstract methods) knows they are deliberately the
    # base class's UNIMPLEMENTED answers.
    RefreshToken = auth_service_pb2_grpc.AuthServiceServicer.RefreshToken
    Logout = auth_service_pb2_grpc.AuthServiceServicer.Logout
    RevokeAllSessions = auth_service_pb2_grpc.AuthServiceServicer.RevokeAllSessions
    IntrospectToken = auth_service_pb2_grpc.AuthServiceServicer.IntrospectToken

    def __init__(self, auth_service: AuthService) -> None:
        self._auth = auth_service

    async def Login(self, request: pb.LoginRequest, context: _Context) -> pb.LoginResponse:
        result = await self._auth.login(email=request.email, password=request.password)
        return mappers.login_response(result)

    async def GetJwks(self, request: pb.GetJwksRequest, context: _Context) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(jwks_json=self._auth.jwks_json())
