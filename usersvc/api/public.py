"""Which RPCs may be called without credentials: decided here and nowhere else.

The auth interceptor asks ``is_public`` once per method; handlers never check.
"""

from __future__ import annotations

LOGIN_METHOD = "/usersvc.v1.AuthService/Login"
GET_JWKS_METHOD = "/usersvc.v1.AuthService/GetJwks"
# The refresh token itself is the credential: its holder has no access token.
REFRESH_TOKEN_METHOD = "/usersvc.v1.AuthService/RefreshToken"  # noqa: S105 - a method name
CREATE_USER_METHOD = "/usersvc.v1.UserService/CreateUser"
# The reset code is the credential: its holder has lost the password.
RESET_PASSWORD_METHOD = "/usersvc.v1.UserService/ResetPassword"  # noqa: S105 - a method name

# Whole services: health checks (load balancers, `usersvc healthcheck`) and
# reflection (`grpcurl list`) carry no credentials.
PUBLIC_SERVICE_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


class PublicMethods:
    """The selector of public methods. ``allow_signup`` makes CreateUser
    public (the service still limits what an anonymous caller may create)."""

    __slots__ = ("_methods",)

    def __init__(self, allow_signup: bool) -> None:
        methods = {LOGIN_METHOD, GET_JWKS_METHOD, REFRESH_TOKEN_METHOD, RESET_PASSWORD_METHOD}
        if allow_signup:
            methods.add(CREATE_USER_METHOD)
        self._methods = frozenset(methods)

    def is_public(self, full_method: str) -> bool:
        """True when ``full_method`` ("/package.Service/Method") may be called
        without an access token. Never raises."""
        return full_method in self._methods or full_method.startswith(PUBLIC_SERVICE_PREFIXES)
