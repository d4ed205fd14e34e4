"""usersvc.v1.AuthService over gRPC.

Each RPC is thin: request -> service call as the caller from the request
context -> response. Which RPCs need no token is decided by
``usersvc.api.public`` (Login, RefreshToken, GetJwks), never here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

from usersvc_protos.v1 import auth_service_pb2 as pb
from usersvc_protos.v1 import auth_service_pb2_grpc
from usersvc.api import mappers
from usersvc.api.context import current_principal

if TYPE_CHECKING:
    from usersvc.services.auth import AuthService

_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class AuthServicer(auth_service_pb2_grpc.AuthServiceServicer):
    """Every method raises what the service raises (usersvc.domain.errors)."""

    def __init__(self, auth_service: AuthService) -> None:
        self._auth = auth_service

    async def Login(self, request: pb.LoginRequest, context: _Context) -> pb.LoginResponse:
        result = await self._auth.login(email=request.email, password=request.password)
        return mappers.login_response(result)

    async def RefreshToken(
        self, request: pb.RefreshTokenRequest, context: _Context
    ) -> pb.RefreshTokenResponse:
        result = await self._auth.refresh_token(refresh_token=request.refresh_token)
        return mappers.refresh_token_response(result)

    async def Logout(self, request: pb.LogoutRequest, context: _Context) -> pb.LogoutResponse:
        await self._auth.logout(principal=current_principal(), refresh_token=request.refresh_token)
        return pb.LogoutResponse()

    async def RevokeAllSessions(
        self, request: pb.RevokeAllSessionsRequest, context: _Context
    ) -> pb.RevokeAllSessionsResponse:
        count = await self._auth.revoke_all_sessions(
            principal=current_principal(), user_id=request.user_id
        )
        return pb.RevokeAllSessionsResponse(revoked_count=count)

    async def GetJwks(self, request: pb.GetJwksRequest, context: _Context) -> pb.GetJwksResponse:
        return pb.GetJwksResponse(jwks_json=self._auth.jwks_json())

    async def IntrospectToken(
        self, request: pb.IntrospectTokenRequest, context: _Context
    ) -> pb.IntrospectTokenResponse:
        result = await self._auth.introspect_token(
            principal=current_principal(), token=request.token
        )
        return mappers.introspect_token_response(result)
