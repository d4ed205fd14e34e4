"""Service identities from client certificates (usersvc.api.interceptors.auth):
which name of a certificate is the identity, and when it decides who calls.
The auth_context dictionaries have the shape grpc gives a server for a
verified client certificate."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import grpc
import pytest

from usersvc.api.context import current_principal
from usersvc.api.interceptors.auth import AuthInterceptor, certificate_identity
from usersvc.api.public import PublicMethods
from usersvc.domain.errors import TokenInvalid
from usersvc.domain.models import ANONYMOUS, Principal, PrincipalKind

BILLING = "spiffe://corp/billing"
IDENTITIES = {BILLING: frozenset({"service"}), "orders.internal": frozenset({"service", "admin"})}
PROTECTED = "/usersvc.v1.UserService/LookupUser"
PUBLIC = "/usersvc.v1.AuthService/GetJwks"
USER = Principal(kind=PrincipalKind.USER, subject="u-1", roles=frozenset({"user"}))


def peer(uris: Iterable[str] = (), dns: Iterable[str] = ()) -> dict[str, list[bytes]]:
    context: dict[str, list[bytes]] = {"transport_security_type": [b"ssl"]}
    if uris:
        context["peer_uri"] = [u.encode() for u in uris]
    if dns:
        context["peer_dns"] = [d.encode() for d in dns]
    return context


# -- certificate_identity ----------------------------------------------------------------


def test_the_san_uri_is_the_identity() -> None:
    assert certificate_identity(peer([BILLING], ["billing.internal"]), IDENTITIES) == BILLING


def test_without_a_uri_the_dns_name_is_the_identity() -> None:
    assert certificate_identity(peer(dns=["orders.internal"]), IDENTITIES) == "orders.internal"


def test_a_uri_wins_over_a_mapped_dns_name() -> None:
    context = peer(["spiffe://corp/other"], ["orders.internal"])
    assert certificate_identity(context, IDENTITIES) == "spiffe://corp/other"


def test_among_several_dns_names_the_mapped_one_is_the_identity() -> None:
    context = peer(dns=["orders-7f9.pods.local", "orders.internal"])
    assert certificate_identity(context, IDENTITIES) == "orders.internal"


def test_among_several_unmapped_names_the_first_is_the_identity() -> None:
    assert certificate_identity(peer(dns=["a.internal", "b.internal"]), IDENTITIES) == "a.internal"


def test_dns_names_compare_without_case() -> None:
    assert certificate_identity(peer(dns=["Orders.Internal"]), IDENTITIES) == "orders.internal"


@pytest.mark.parametrize("context", [{}, {"transport_security_type": [b"insecure"]}, peer()])
def test_no_certificate_name_is_no_identity(context: dict[str, list[bytes]]) -> None:
    assert certificate_identity(context, IDENTITIES) is None


# -- the interceptor -----------------------------------------------------------------------


class FakeContext:
    def __init__(self, auth_context: dict[str, list[bytes]], token: str | None = None) -> None:
        self._auth_context = auth_context
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth_context


class TokensOfAlice:
    def authenticate(self, token: str) -> Principal:
        if token != "alice":
            raise TokenInvalid()
        return USER


async def principal_of(method: str, context: FakeContext) -> Principal:
    async def handler(request: Any, _context: Any) -> Principal:
        return current_principal()

    interceptor = AuthInterceptor(
        auth_service=TokensOfAlice(),
        public_methods=PublicMethods(allow_signup=False),
        service_identities=IDENTITIES,
    )
    wrapped = interceptor.wrap(grpc.unary_unary_rpc_method_handler(handler), method)
    behaviour: Any = wrapped.unary_unary
    result: Principal = await behaviour(object(), context)
    return result


async def test_a_mapped_certificate_is_a_service_with_its_roles() -> None:
    principal = await principal_of(PROTECTED, FakeContext(peer(dns=["orders.internal"])))
    assert principal == Principal(
        kind=PrincipalKind.SERVICE,
        subject="orders.internal",
        roles=frozenset({"service", "admin"}),
    )


async def test_an_unmapped_certificate_is_a_service_without_roles() -> None:
    principal = await principal_of(PROTECTED, FakeContext(peer(["spiffe://corp/x"])))
    assert (principal.kind, principal.subject, principal.roles) == (
        PrincipalKind.SERVICE,
        "spiffe://corp/x",
        frozenset(),
    )


async def test_a_bearer_token_decides_over_a_certificate() -> None:
    assert await principal_of(PROTECTED, FakeContext(peer([BILLING]), token="alice")) == USER


async def test_a_bad_bearer_token_is_refused_even_with_a_certificate() -> None:
    with pytest.raises(TokenInvalid):
        await principal_of(PROTECTED, FakeContext(peer([BILLING]), token="mallory"))


async def test_without_token_or_certificate_a_protected_method_is_refused() -> None:
    with pytest.raises(TokenInvalid):
        await principal_of(PROTECTED, FakeContext({}))


async def test_without_token_or_certificate_a_public_method_is_anonymous() -> None:
    assert await principal_of(PUBLIC, FakeContext({})) == ANONYMOUS


async def test_a_certificate_identifies_the_caller_of_a_public_method_too() -> None:
    principal = await principal_of(PUBLIC, FakeContext(peer([BILLING])))
    assert principal.subject == BILLING
