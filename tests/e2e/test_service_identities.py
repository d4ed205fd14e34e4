"""TLS and service identities (mTLS): the server's ports, which certificates
get in, and what a certificate identity may do.

The PKI is made here: a corporate CA (server and client certificates) and a
foreign CA whose client certificates must never get in. grpc servers cannot
ask for an optional client certificate (see usersvc/server.py), so the server
under test has two ports: the main one (TLS, bearer tokens) and the mTLS one
(a verified client certificate required)."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import pytest_asyncio
from log_secrets import SWEEP
from support.servers import clean_environ, run_usersvc

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    auth_service_pb2,
    expect_denied,
    expect_token_invalid,
    new_email,
    new_password,
    user_service_pb2,
)
from .pki import Authority, Issued
from .test_anonymous_refusal import (
    call_with_empty_request,
    offered_methods,
    path_of,
    refused_as_anonymous,
)

BILLING = "spiffe://corp.example/billing"
ORDERS = "orders.internal"
IDENTITIES = {BILLING: frozenset({"service"}), ORDERS: frozenset({"service", "admin"})}


@dataclasses.dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Issued
    billing: Issued  # SAN URI, mapped to service
    orders: Issued  # DNS name only, mapped to service+admin
    stranger: Issued  # signed by our CA, identity not mapped
    uri_before_dns: Issued  # unmapped URI and the mapped DNS name
    nameless: Issued  # no subjectAltName at all
    impostor: Issued  # claims the billing identity, signed by a foreign CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = Authority.create(directory, "corp")
    foreign = Authority.create(directory, "foreign")
    return Pki(
        ca=ca,
        server=ca.server(),
        billing=ca.client("billing", uris=(BILLING,), dns=("billing.internal",)),
        orders=ca.client("orders", dns=(ORDERS,)),
        stranger=ca.client("stranger", uris=("spiffe://corp.example/stranger",)),
        uri_before_dns=ca.client("mixed", uris=("spiffe://corp.example/unlisted",), dns=(ORDERS,)),
        nameless=ca.client("nameless"),
        impostor=foreign.client("impostor", uris=(BILLING,)),
    )


def tls_settings(e2e_settings: Any, pki: Pki, **changes: Any) -> Any:
    tls = {
        "tls_cert_file": pki.server.cert_file,
        "tls_key_file": pki.server.key_file,
        "tls_client_ca_file": pki.ca.cert_file,
        "service_identities": IDENTITIES,
    }
    return dataclasses.replace(e2e_settings, **(tls | changes))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_server(
    e2e_settings: Any, pki: Pki, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """Main port TLS (bearer tokens), second port mTLS."""
    settings = tls_settings(e2e_settings, pki, mtls_listen_addr="127.0.0.1:0")
    async with running_server(settings, recorder) as running:
        yield running


def channel_to(port: int, pki: Pki, client: Issued | None = None) -> grpc.aio.Channel:
    credentials = grpc.ssl_channel_credentials(
        pki.ca.cert_pem,
        client.key_pem if client else None,
        client.cert_pem if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


@pytest_asyncio.fixture(loop_scope="session")
async def seeded_user(tls_server: RunningServer, recorder: ResponseRecorder) -> tuple[str, str]:
    """A user (email, password) in the database, created by an operator."""
    from usersvc.domain.models import ROLE_ADMIN, Principal, PrincipalKind
    from usersvc.services.inputs import CreateUserInput

    operator = Principal(kind=PrincipalKind.SERVICE, subject="e2e", roles=frozenset({ROLE_ADMIN}))
    email, password = new_email("tls"), new_password(recorder)
    await tls_server.container.user_service.create_user(
        principal=operator,
        request=CreateUserInput(
            email=email, password=password, display_name="", roles=("user",), labels={}
        ),
    )
    return email, password


def lookup(email: str) -> user_service_pb2.LookupUserRequest:
    return user_service_pb2.LookupUserRequest(email=email)


async def expect_no_connection(call: Any) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value


# -- mapped and unmapped identities -------------------------------------------------------


async def test_a_mapped_spiffe_identity_gets_its_roles(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.billing) as channel:
        reply = await Caller(channel, None).users.LookupUser(lookup(seeded_user[0]))
    assert reply.user.email == seeded_user[0]


async def test_a_mapped_dns_identity_gets_its_roles(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.orders) as channel:
        caller = Caller(channel, None)
        found = await caller.users.LookupUser(lookup(seeded_user[0]))
        # admin, too: only admins may disable a user.
        reply = await caller.users.DisableUser(
            user_service_pb2.DisableUserRequest(id=found.user.id)
        )
    assert reply.user.state == reply.user.STATE_DISABLED


async def test_a_service_identity_without_the_admin_role_cannot_act_as_admin(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.billing) as channel:
        caller = Caller(channel, None)
        found = await caller.users.LookupUser(lookup(seeded_user[0]))
        await expect_denied(
            caller.users.DisableUser(user_service_pb2.DisableUserRequest(id=found.user.id))
        )


async def test_an_unmapped_identity_is_authenticated_but_allowed_nothing(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.stranger) as channel:
        await expect_denied(Caller(channel, None).users.LookupUser(lookup(seeded_user[0])))


async def test_the_san_uri_is_the_identity_even_when_a_dns_name_is_mapped(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.uri_before_dns) as channel:
        await expect_denied(Caller(channel, None).users.LookupUser(lookup(seeded_user[0])))


async def test_a_certificate_naming_no_identity_is_anonymous(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.nameless) as channel:
        await expect_token_invalid(Caller(channel, None).users.LookupUser(lookup(seeded_user[0])))


async def test_public_methods_work_with_a_certificate(tls_server: RunningServer, pki: Pki) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.stranger) as channel:
        reply = await Caller(channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest())
    assert "keys" in reply.jwks_json


@pytest.mark.parametrize("client", ["billing", "orders", "stranger"])
async def test_no_method_fails_internally_for_a_service_identity(
    tls_server: RunningServer, pki: Pki, client: str
) -> None:
    # Service principals have no user row and no session: every method must
    # answer them with a proper status (done, denied, invalid), never a crash.
    crashed, unidentified = [], []
    async with channel_to(tls_server.server.mtls_port, pki, getattr(pki, client)) as channel:
        methods = await offered_methods(channel)
        for method in methods:
            error = await call_with_empty_request(channel, method)
            if error is not None and error.code() in CRASHES:
                crashed.append((path_of(method), error.code()))
            if refused_as_anonymous(error):
                unidentified.append(path_of(method))
    assert len(methods) > 20
    assert crashed == []
    assert unidentified == []


CRASHES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


# -- a bearer token decides -----------------------------------------------------------------


async def test_a_bearer_token_decides_over_the_certificate(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    email, password = seeded_user
    async with channel_to(tls_server.server.mtls_port, pki, pki.orders) as channel:
        login = await Caller(channel, None).auth.Login(
            auth_service_pb2.LoginRequest(email=email, password=password)
        )
        as_user = Caller(channel, login.access_token)
        me = await as_user.users.GetUser(user_service_pb2.GetUserRequest(id="me"))
        # The certificate would allow it; the plain user the token names may not.
        await expect_denied(as_user.users.LookupUser(lookup(email)))
    assert me.user.email == email


async def test_an_invalid_bearer_token_is_refused_despite_a_good_certificate(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.orders) as channel:
        await expect_token_invalid(
            Caller(channel, "not-a-token").users.LookupUser(lookup(seeded_user[0]))
        )


# -- who gets in on which port ----------------------------------------------------------------


async def test_a_certificate_of_a_foreign_ca_cannot_connect(
    tls_server: RunningServer, pki: Pki
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki, pki.impostor) as channel:
        await expect_no_connection(
            Caller(channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest())
        )


async def test_the_mtls_port_refuses_a_client_without_a_certificate(
    tls_server: RunningServer, pki: Pki
) -> None:
    async with channel_to(tls_server.server.mtls_port, pki) as channel:
        await expect_no_connection(
            Caller(channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest())
        )


async def test_the_main_port_serves_bearer_tokens_over_tls_without_a_certificate(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    email, password = seeded_user
    async with channel_to(tls_server.server.port, pki) as channel:
        login = await Caller(channel, None).auth.Login(
            auth_service_pb2.LoginRequest(email=email, password=password)
        )
        me = await Caller(channel, login.access_token).users.GetUser(
            user_service_pb2.GetUserRequest(id="me")
        )
    assert me.user.email == email


async def test_the_main_port_never_takes_a_certificate_as_identity(
    tls_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    # The port does not ask for client certificates, so it cannot have
    # verified one: the caller stays anonymous.
    async with channel_to(tls_server.server.port, pki, pki.billing) as channel:
        await expect_token_invalid(Caller(channel, None).users.LookupUser(lookup(seeded_user[0])))


@pytest.mark.parametrize("port_name", ["port", "mtls_port"])
async def test_plaintext_to_a_tls_port_fails(tls_server: RunningServer, port_name: str) -> None:
    port = getattr(tls_server.server, port_name)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await expect_no_connection(
            Caller(channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest(), timeout=5)
        )


async def test_the_healthcheck_command_verifies_the_tls_server(
    tls_server: RunningServer, pki: Pki, e2e_settings: Any
) -> None:
    env = clean_environ() | {
        "USERSVC_LISTEN_ADDR": f"127.0.0.1:{tls_server.server.port}",
        "USERSVC_TLS_CERT_FILE": str(pki.server.cert_file),
        "USERSVC_TLS_KEY_FILE": str(pki.server.key_file),
        "USERSVC_DATA_DIR": str(e2e_settings.data_dir),
        "USERSVC_LOG_FORMAT": "text",
    }
    result = await run_usersvc(env, "healthcheck", "--ca-file", str(pki.ca.cert_file))
    SWEEP.add_text("usersvc healthcheck", result.stderr)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "SERVING"


# -- one port, client certificates required ---------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def single_port_server(
    e2e_settings: Any, pki: Pki, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    async with running_server(tls_settings(e2e_settings, pki), recorder) as running:
        yield running


async def test_with_a_client_ca_and_one_port_every_caller_needs_a_certificate(
    single_port_server: RunningServer, pki: Pki
) -> None:
    assert single_port_server.server.mtls_port is None
    async with channel_to(single_port_server.server.port, pki) as channel:
        await expect_no_connection(
            Caller(channel, None).auth.GetJwks(auth_service_pb2.GetJwksRequest())
        )


async def test_with_one_port_a_mapped_certificate_gets_its_roles(
    single_port_server: RunningServer, pki: Pki, seeded_user: tuple[str, str]
) -> None:
    async with channel_to(single_port_server.server.port, pki, pki.billing) as channel:
        reply = await Caller(channel, None).users.LookupUser(lookup(seeded_user[0]))
    assert reply.user.email == seeded_user[0]


async def test_a_server_whose_key_does_not_match_its_certificate_refuses_to_start(
    e2e_settings: Any, pki: Pki, recorder: ResponseRecorder
) -> None:
    from usersvc.adapters.tls import TlsConfigError

    settings = tls_settings(e2e_settings, pki, tls_key_file=pki.billing.key_file)
    with pytest.raises(TlsConfigError, match="USERSVC_TLS_KEY_FILE"):
        async with running_server(settings, recorder):
            pass
