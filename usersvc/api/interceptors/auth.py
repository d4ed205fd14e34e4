"""Who is calling: the bearer token in ``authorization`` metadata, verified by
the auth service, becomes the principal of the call (``usersvc.api.context``).
Without a token, a verified client certificate (mTLS) makes the caller a
service, with the roles its identity is given by configuration. Which methods
need no credentials is decided by ``usersvc.api.public``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any, Protocol, cast

from usersvc.api.context import set_principal
from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    WrappingInterceptor,
    wrap_with_prelude,
)
from usersvc.api.public import PublicMethods
from usersvc.config import normalize_identity
from usersvc.domain.errors import TokenInvalid
from usersvc.domain.models import ANONYMOUS, Principal, PrincipalKind

AUTHORIZATION_KEY = "authorization"
# RFC 6750: the scheme is case-insensitive, then one space, then the token.
_BEARER = re.compile(r"(?i:bearer) (\S+)")
# grpc's auth_context properties of the peer's certificate: every URI and
# every DNS name of its subjectAltName.
_PEER_URI = "peer_uri"
_PEER_DNS = "peer_dns"


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


def certificate_identity(
    auth_context: Mapping[str, Iterable[bytes]], identities: Mapping[str, frozenset[str]]
) -> str | None:
    """The identity the peer's certificate proves: a SAN URI (a SPIFFE ID,
    say) if it has any, else a DNS name; among several of the same kind the
    first one ``identities`` names, else the first. None without a
    certificate or without either kind of name. Raises nothing.

    Only verified certificates ever reach auth_context here: the server asks
    for client certificates solely on ports that require one and check it
    against the configured CA (usersvc/server.py), so the presence of these
    properties means the TLS handshake verified them.
    """
    for prop in (_PEER_URI, _PEER_DNS):
        names = [
            normalize_identity(raw.decode("utf-8", "replace"))
            for raw in auth_context.get(prop, ())
        ]
        if names:
            return next((name for name in names if name in identities), names[0])
    return None


class AuthInterceptor(WrappingInterceptor):
    """Authenticates every call. A bearer token, when sent, decides who the
    caller is (a service may call on behalf of a user) and must be valid on
    every method. Without one, a verified client certificate makes the caller
    a service principal whose roles come from ``service_identities`` (none
    for an identity not listed: authenticated, but allowed nothing that
    needs a role). With neither, a public method accepts the call as
    ANONYMOUS. Failures raise TokenInvalid (or what ``authenticate`` raises)
    for ErrorMappingInterceptor to answer."""

    def __init__(
        self,
        *,
        auth_service: Authenticator,
        public_methods: PublicMethods,
        service_identities: Mapping[str, frozenset[str]] | None = None,
    ) -> None:
        super().__init__()
        self._identities: Mapping[str, frozenset[str]] = dict(service_identities or {})
        self._authenticate = auth_service.authenticate
        # Decided once: the service's authenticate may be sync (a cached
        # signature check) or async.
        self._authenticate_is_async = inspect.iscoroutinefunction(self._authenticate)
        self._public_methods = public_methods

    def wrap(self, handler: Handler, method: str) -> Handler:
        public = self._public_methods.is_public(method)
        identify = self._identify

        async def authenticate(context: Context) -> None:
            set_principal(await identify(context, public))

        return wrap_with_prelude(handler, authenticate)

    async def _identify(self, context: Context, public: bool) -> Principal:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            identity = certificate_identity(context.auth_context(), self._identities)
            if identity is not None:
                roles = self._identities.get(identity, frozenset())
                return Principal(kind=PrincipalKind.SERVICE, subject=identity, roles=roles)
            if public:
                return ANONYMOUS
            raise TokenInvalid("missing access token: send 'authorization: Bearer <token>'")
        principal = self._authenticate(token)
        if self._authenticate_is_async:
            principal = await cast(Awaitable[Principal], principal)
        return cast(Principal, principal)
