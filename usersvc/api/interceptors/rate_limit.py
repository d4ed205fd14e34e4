"""Rate limits: a token bucket per caller, checked before the handler runs.

Who the caller is: the principal when the call is authenticated (a user's
id, a service's identity), otherwise the client's address. The address is
the direct peer's, except when that peer is a trusted proxy
(USERSVC_TRUSTED_PROXIES): then ``x-forwarded-for`` is read from the right,
skipping trusted proxies, and the first address that is not one is the
client (everything to its left was written by the client and proves
nothing). IPv6 clients are keyed by their /64, which one host can fill with
addresses at will.

Which bucket: calls that run bcrypt or tell whether an email is registered
draw from the stricter auth bucket, twice: once for the caller and once for
the account they aim at (the email named, or the user id), so that neither
many callers against one account nor one caller against many accounts gets
more than the strict rate. They are Login, CreateUser and BatchCreateUsers
(with any credentials), an UpdateUser that changes the email (its
EMAIL_ALREADY_EXISTS answers whether an email is taken), ChangePassword,
CreatePasswordResetCode, and ResetPassword (it guesses at codes as Login
guesses at passwords). Every other call makes one check of the general
bucket. Health and reflection are never limited: load
balancers and operators must see the server even while a flood is refused.
A refused call gets RESOURCE_EXHAUSTED with ErrorInfo RATE_LIMITED and
RetryInfo saying when a token will be there (ErrorMappingInterceptor builds
it from usersvc.domain.errors.RateLimited).

Calls refused by AuthInterceptor (outside this one: a bad token) are not
counted: they cost one signature check and never reach the database.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable
from urllib.parse import unquote

from usersvc.api.context import current_principal
from usersvc.api.interceptors.wrapping import (
    Context,
    Handler,
    StreamBehaviour,
    UnaryBehaviour,
    WrappingInterceptor,
    wrap_handler,
    wrap_with_prelude,
)
from usersvc.api.public import (
    CREATE_USER_METHOD,
    LOGIN_METHOD,
    PUBLIC_SERVICE_PREFIXES,
    RESET_PASSWORD_METHOD,
)
from usersvc.domain.errors import RateLimited
from usersvc.domain.models import Principal
from usersvc.domain.ports import RateLimitedHook
from usersvc.domain.rate_limits import Rate

FORWARDED_FOR_KEY = "x-forwarded-for"
AUTH_BUCKET = "auth"
API_BUCKET = "api"
# Health and reflection: exempt (see the module docstring).
EXEMPT_PREFIXES = PUBLIC_SERVICE_PREFIXES
# A proxy chain longer than this is not a real deployment; the hops beyond
# it are not looked at.
_MAX_FORWARDED_HOPS = 32
_IPV6_CLIENT_PREFIX = 64

# What a costly call aims at, from its request: a bucket key naming the
# account ("" when the request names none), or None when this request is not
# costly after all (an UpdateUser that leaves the email alone).
TargetOf = Callable[[Any, Principal], str | None]


def _email_target(email: object) -> str:
    # Hashed: bucket keys may live in Redis, and emails are personal data.
    text = email.strip().lower() if isinstance(email, str) else ""
    if not text:
        return ""
    return "email:" + hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]


def _user_target(user_id: object, principal: Principal) -> str:
    text = user_id if isinstance(user_id, str) else ""
    if text == "me":
        text = principal.subject if principal.is_authenticated else ""
    return f"user:{text.strip().lower()[:64]}" if text else ""


def _update_target(request: Any, principal: Principal) -> str | None:
    paths = list(request.update_mask.paths)
    user = request.user
    changes_email = ("email" in paths or "*" in paths) if paths else bool(user.email)
    return _email_target(user.email) if changes_email else None


_SERVICE = "/usersvc.v1.UserService/"
COSTLY_METHODS: dict[str, TargetOf] = {
    LOGIN_METHOD: lambda request, _: _email_target(request.email),
    CREATE_USER_METHOD: lambda request, _: _email_target(request.email),
    # Each item hashes a password; the items' emails are too many to key.
    _SERVICE + "BatchCreateUsers": lambda _request, _principal: "",
    _SERVICE + "UpdateUser": _update_target,
    _SERVICE + "ChangePassword": lambda request, principal: _user_target(request.id, principal),
    RESET_PASSWORD_METHOD: lambda request, _: _email_target(request.email),
    _SERVICE + "CreatePasswordResetCode": lambda request, _: _email_target(request.email),
}


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class RateLimiter(Protocol):
    """What the interceptor needs of usersvc.adapters.ratelimit."""

    async def acquire(self, rate: Rate, key: str) -> float:
        """Take a token from bucket ``key``: 0.0 when taken, else seconds
        until one is available. Never raises."""
        ...


@runtime_checkable
class ImmediateRateLimiter(Protocol):
    """A limiter that answers without waiting (the in-process one): the
    interceptor then checks the general bucket synchronously, which spares
    every call four coroutines."""

    def take(self, rate: Rate, key: str) -> float:
        """``acquire``, answered at once. Never raises."""
        ...


def peer_ip(peer: str) -> IPAddress | None:
    """The IP address of a grpc peer string ("ipv4:1.2.3.4:5678",
    "ipv6:[::1]:5678", percent-encoded or not); None for anything else
    (a Unix socket). Raises nothing."""
    kind, _, rest = unquote(peer).partition(":")
    if kind not in ("ipv4", "ipv6"):
        return None
    return _parse_ip(rest)


def _parse_ip(text: str) -> IPAddress | None:
    # An address, optionally with a port: "1.2.3.4", "1.2.3.4:80", "::1",
    # "[::1]", "[::1]:80".
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def forwarded_for(metadata: Iterable[tuple[str, Any]] | None) -> list[str]:
    """The hops of every ``x-forwarded-for`` header, left to right. Raises
    nothing."""
    hops: list[str] = []
    for key, value in metadata or ():
        if key == FORWARDED_FOR_KEY and isinstance(value, str):
            hops.extend(value.split(","))
    return hops


def client_ip(
    peer: IPAddress | None, hops: Sequence[str], trusted: Sequence[IPNetwork]
) -> IPAddress | None:
    """The client's address: the peer, or when the peer is a trusted proxy
    the right-most hop of ``x-forwarded-for`` that is not one (the
    left-most hop when all are trusted; the last trusted address when a
    hop is not an address at all). Raises nothing."""
    if peer is None or not _is_trusted(peer, trusted):
        return peer
    address = peer
    for hop in list(reversed(hops))[:_MAX_FORWARDED_HOPS]:
        parsed = _parse_ip(hop)
        if parsed is None:
            break
        address = parsed
        if not _is_trusted(parsed, trusted):
            break
    return address


def _is_trusted(address: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(address.version == net.version and address in net for net in trusted)


def caller_key(principal: Principal, address: IPAddress | None, peer: str) -> str:
    """The bucket key of a caller: its principal when authenticated, else
    its address (an IPv6 address's /64). Raises nothing."""
    if principal.is_authenticated:
        return f"{principal.kind.value}:{principal.subject}"
    if address is None:
        # A Unix socket: every local caller shares one bucket.
        return "peer:" + peer.partition(":")[0]
    if isinstance(address, ipaddress.IPv6Address):
        net = ipaddress.IPv6Network((address, _IPV6_CLIENT_PREFIX), strict=False)
        return f"ip:{net}"
    return f"ip:{address}"


class RateLimitInterceptor(WrappingInterceptor):
    """Checks the caller's bucket before each call of a limited method and
    raises RateLimited when it is empty. ``general`` or ``auth`` None turns
    that bucket off."""

    def __init__(
        self,
        *,
        limiter: RateLimiter,
        general: Rate | None,
        auth: Rate | None,
        trusted_proxies: Sequence[IPNetwork] = (),
        on_rejected: RateLimitedHook | None = None,
    ) -> None:
        """``on_rejected`` hears the bucket kind of each refusal (metrics)."""
        super().__init__()
        self._on_rejected = on_rejected
        self._limiter = limiter
        # Decided once: a limiter that answers at once is asked synchronously.
        self._take_now = limiter.take if isinstance(limiter, ImmediateRateLimiter) else None
        self._general = general
        self._auth = auth
        self._trusted = tuple(trusted_proxies)

    def wrap(self, handler: Handler, method: str) -> Handler:
        if method.startswith(EXEMPT_PREFIXES):
            return handler
        check = self._check
        target_of = COSTLY_METHODS.get(method)
        if target_of is None or handler.request_streaming:
            general, take_now, key_of = self._general, self._take_now, self._key
            if general is None:
                return handler
            if take_now is not None:

                def admit_now(context: Context) -> None:
                    wait = take_now(general, key_of(context, current_principal(), API_BUCKET))
                    if wait > 0:
                        self._refuse(API_BUCKET, wait)

                return wrap_with_prelude(handler, admit_now)

            async def admit(context: Context) -> None:
                await check(context, current_principal(), API_BUCKET, general)

            return wrap_with_prelude(handler, admit)
        admit_costly = self._admit_costly

        def unary(inner: UnaryBehaviour) -> UnaryBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                await admit_costly(request, context, target_of)
                return await inner(request, context)

            return behaviour

        def stream(inner: StreamBehaviour) -> StreamBehaviour:
            async def behaviour(request: Any, context: Context) -> Any:
                await admit_costly(request, context, target_of)
                async for response in inner(request, context):
                    yield response

            return behaviour

        return wrap_handler(handler, unary=unary, stream=stream)

    async def _admit_costly(self, request: Any, context: Context, target_of: TargetOf) -> None:
        principal = current_principal()
        try:
            target = target_of(request, principal)
        except (AttributeError, TypeError, ValueError):
            # Not the message we expect: the handler will refuse it; the
            # caller's strict bucket still pays.
            target = ""
        if target is None:
            await self._check(context, principal, API_BUCKET, self._general)
            return
        # The caller first: a caller already refused does not drain the
        # account's bucket for everybody else.
        await self._check(context, principal, AUTH_BUCKET, self._auth)
        if target:
            await self._take(AUTH_BUCKET, self._auth, f"{AUTH_BUCKET}:target:{target}")

    async def _check(
        self, context: Context, principal: Principal, bucket: str, rate: Rate | None
    ) -> None:
        if rate is None:
            return
        await self._take(bucket, rate, self._key(context, principal, bucket))

    def _key(self, context: Context, principal: Principal, bucket: str) -> str:
        if principal.is_authenticated:
            # The peer is only needed for callers without a principal.
            return f"{bucket}:{caller_key(principal, None, '')}"
        peer = context.peer() or ""
        address = client_ip(
            peer_ip(peer), forwarded_for(context.invocation_metadata()), self._trusted
        )
        return f"{bucket}:{caller_key(principal, address, peer)}"

    async def _take(self, bucket: str, rate: Rate | None, key: str) -> None:
        if rate is None:
            return
        wait = await self._limiter.acquire(rate, key)
        if wait > 0:
            self._refuse(bucket, wait)

    def _refuse(self, bucket: str, wait: float) -> None:
        if self._on_rejected is not None:
            self._on_rejected(bucket)
        raise RateLimited(wait, f"too many requests; retry in {wait:.3f} s")
