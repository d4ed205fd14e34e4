"""Who is calling: the bearer token in ``authorization`` metadata, verified by
the auth service, becomes the principal of the call (``usersvc.api.context``).
Without a token, a verified client certificate (mTLS) makes the caller a
service, with the roles its identity is given by configuration. Which methods
need no credentials is decided by ``usersvc.api.public``."""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Collection, Iterable, Mapping
from typing import Any, Protocol, cast, runtime_checkable

import grpc

from usersvc.api.context import set_principal, set_role_check
from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
    WrappingInterceptor,
    wrap_handler,
    wrap_with_prelude,
)
from usersvc.api.public import PublicMethods
from usersvc.config import normalize_identity
from usersvc.domain.errors import TokenInvalid
from usersvc.domain.models import ANONYMOUS, Principal, PrincipalKind
from usersvc.domain.role_checks import RoleCheck

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


@runtime_checkable
class DeferringAuthenticator(Protocol):
    """An Authenticator that can leave the re-check of a privileged token's
    roles (usersvc.domain.role_checks) to the call's own read."""

    async def authenticate_deferring_role_check(
        self, token: str
    ) -> tuple[Principal, RoleCheck | None]:
        """``authenticate`` without the re-check, which it returns. Raises
        what ``authenticate`` raises."""
        ...

    async def settle_role_check(self, role_check: RoleCheck) -> None:
        """Do the re-check unless it is done. Raises TokenRevoked when it
        failed, DatabaseUnavailable."""
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
            normalize_identity(raw.decode("utf-8", "replace")) for raw in auth_context.get(prop, ())
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
        role_checked_in_statement: Collection[str] = (),
    ) -> None:
        """``role_checked_in_statement`` names the (unary) methods whose
        handler settles the caller's role re-check in its own statement
        (usersvc.api.context.current_role_check): a read, or a write that
        refuses itself when the check fails, so that nothing is written for
        a token that no longer holds. The interceptor then settles the check
        itself only when the handler did not (it ended before its
        statement)."""
        super().__init__()
        self._identities: Mapping[str, frozenset[str]] = dict(service_identities or {})
        self._authenticate = auth_service.authenticate
        # Decided once: the service's authenticate may be sync (a cached
        # signature check) or async.
        self._authenticate_is_async = inspect.iscoroutinefunction(self._authenticate)
        self._public_methods = public_methods
        self._deferring = auth_service if isinstance(auth_service, DeferringAuthenticator) else None
        self._role_checked_in_statement = frozenset(role_checked_in_statement)

    def wrap(self, handler: Handler, method: str) -> Handler:
        public = self._public_methods.is_public(method)
        deferring = self._deferring
        if (
            deferring is not None
            and method in self._role_checked_in_statement
            and not handler.request_streaming
            and not handler.response_streaming
        ):
            return self._wrap_deferring(handler, public, deferring)
        identify = self._identify

        async def authenticate(context: Context) -> None:
            set_principal(await identify(context, public))

        return wrap_with_prelude(handler, authenticate)

    def _wrap_deferring(
        self, handler: Handler, public: bool, deferring: DeferringAuthenticator
    ) -> Handler:
        # A privileged token's re-check (a read of the caller's account)
        # rides on the handler's own statement: one instead of two.
        # Whatever path the handler takes, the check is settled before the
        # call answers, and its failure is the answer (TOKEN_REVOKED).
        identify = self._identify_deferring
        settle = deferring.settle_role_check

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                principal, role_check = await identify(context, public, deferring)
                set_principal(principal)
                if role_check is None:
                    return await inner(request, context)
                set_role_check(role_check)
                try:
                    response = await inner(request, context)
                except grpc.aio.AbortError:
                    raise  # the status is sent already
                except Exception:
                    # Ended before its read (a bad argument, say), or by the
                    # failed check itself: the check decides the answer.
                    await settle(role_check)
                    raise
                await settle(role_check)
                return response

            return behaviour

        return wrap_handler(handler, unary=unary, stream=_unchanged)

    async def _identify_deferring(
        self, context: Context, public: bool, deferring: DeferringAuthenticator
    ) -> tuple[Principal, RoleCheck | None]:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            return self._without_token(context, public), None
        return await deferring.authenticate_deferring_role_check(token)

    async def _identify(self, context: Context, public: bool) -> Principal:
        token = bearer_token(context.invocation_metadata())
        if token is None:
            return self._without_token(context, public)
        principal = self._authenticate(token)
        if self._authenticate_is_async:
            principal = await cast(Awaitable[Principal], principal)
        return cast(Principal, principal)

    def _without_token(self, context: Context, public: bool) -> Principal:
        identity = certificate_identity(context.auth_context(), self._identities)
        if identity is not None:
            roles = self._identities.get(identity, frozenset())
            return Principal(kind=PrincipalKind.SERVICE, subject=identity, roles=roles)
        if public:
            return ANONYMOUS
        raise TokenInvalid("missing access token: send 'authorization: Bearer <token>'")


def _unchanged(inner: StreamBehaviour) -> StreamBehaviour:
    # Only unary methods defer the re-check (see AuthInterceptor.wrap).
    return inner
