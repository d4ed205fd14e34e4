"""Who is calling: the bearer token in ``authorization`` metadata, verified by
the auth service, becomes the principal of the call (``usersvc.api.context``).
Which methods need no token is decided by ``usersvc.api.public``."""

from __future__ import annotations

import inspect
import re
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Any, Protocol, cast

from usersvc.api.context import set_principal
from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
    WrappingInterceptor,
    wrap_handler,
)
from usersvc.api.public import PublicMethods
from usersvc.domain.errors import TokenInvalid
from usersvc.domain.models import ANONYMOUS, Principal

AUTHORIZATION_KEY = "authorization"
# RFC 6750: the scheme is case-insensitive, then one space, then the token.
_BEARER = re.compile(r"(?i:bearer) (\S+)")


class Authenticator(Protocol):
    """What the interceptor needs of usersvc.services.auth.AuthService."""

    def authenticate(self, token: str) -> Principal | Awaitable[Principal]:
        """The principal ``token`` proves. Raises TokenInvalid, TokenExpired
        or TokenRevoked."""
        ...


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The access token of ``authorization: Bearer <token>``; None when there
    is no authorization metadata.

    Raises TokenInvalid when it is there but not exactly one bearer token.
    """
    value: Any = None
    for key, item in metadata or ():
        if key == AUTHORIZATION_KEY:
            if value is not None:
                raise TokenInvalid("send one authorization header, not several")
            value = item
    if value is None:
        return None
    match = _BEARER.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise TokenInvalid("authorization must be 'Bearer <access token>'")
    return match.group(1)


class AuthInterceptor(WrappingInterceptor):
    """Authenticates every call. A public method accepts a call without
    authorization metadata as ANONYMOUS, but a token that is there must be
    valid on every method; anything else raises TokenInvalid (or what
    ``authenticate`` raises) for ErrorMappingInterceptor to answer."""

    def __init__(self, *, auth_service: Authenticator, public_methods: PublicMethods) -> None:
        super().__init__()
        self._authenticate = auth_service.authenticate
        # Decided once: the service's authenticate may be sync (a cached
        # signature check) or async.
        self._authenticate_is_async = inspect.iscoroutinefunction(self._authenticate)
        self._public_methods = public_methods

    def wrap(self, handler: Handler, method: str) -> Handler:
        public = self._public_methods.is_public(method)
        identify = self._identify

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                set_principal(await identify(context, public))
                return await inner(request, context)

            return behaviour

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def behaviour(request: Any, context: Context) -> AsyncIterator[Any]:
                set_principal(await identify(context, public))
                async for response in inner(request, context):
                    yield response

            return behaviour

        return wrap_handler(handler, unary=unary, stream=stream)

    async def _identify(self, context: Context, public: bool) -> Principal:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            if public:
                return ANONYMOUS
            raise TokenInvalid("missing access token: send 'authorization: Bearer <token>'")
        principal = self._authenticate(token)
        if self._authenticate_is_async:
            principal = await cast(Awaitable[Principal], principal)
        return cast(Principal, principal)
