"""usersvc.client against real servers: typed results and errors, the
login credential's refreshes (driven by a fake clock, counted by a client
interceptor), pagination, deadlines, and TLS / mTLS."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import bcrypt
import grpc
import pytest
import pytest_asyncio
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.client import (
    DeadlineExceeded,
    EmailAlreadyExists,
    EtagMismatch,
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    PasswordLogin,
    PermissionDenied,
    RefreshTokenInvalid,
    StaticToken,
    TlsConfig,
    Unavailable,
    UserNotFound,
    UsersvcClient,
    WeakPassword,
)

from .conftest import RunningServer, running_server
from .helpers import (
    ResponseRecorder,
    World,
    missing_id,
    new_email,
    new_password,
    user_pb2,
    user_service_pb2,
)
from .pki import Authority, Issued
from .test_deadlines import row_locked

SHORT_TTL_SECONDS = 30
BILLING = "spiffe://corp.example/billing"


class FakeClock:
    """Monotonic seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class MethodCounter(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Counts the calls a client makes, by method name."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = method.decode() if isinstance(method, bytes) else str(method)
        self.calls[name.rsplit("/", 1)[-1]] += 1
        return await continuation(client_call_details, request)


@pytest.fixture
def counter() -> MethodCounter:
    return MethodCounter()


class TimeoutRecorder(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """The timeout each call was made with, by method name."""

    def __init__(self) -> None:
        self.timeouts: dict[str, list[float | None]] = {}

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        method = client_call_details.method
        name = (method.decode() if isinstance(method, bytes) else str(method)).rsplit("/", 1)[-1]
        self.timeouts.setdefault(name, []).append(client_call_details.timeout)
        return await continuation(client_call_details, request)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def connect(
    server: RunningServer, recorder: ResponseRecorder, *extra: Any, **options: Any
) -> UsersvcClient:
    """A client whose traffic also goes through the suite's leak check."""
    return UsersvcClient.connect(server.address, interceptors=[recorder, *extra], **options)


@pytest_asyncio.fixture(loop_scope="session")
async def admin(
    primary: RunningServer, world: World, recorder: ResponseRecorder
) -> AsyncIterator[UsersvcClient]:
    credentials = PasswordLogin(world.admin.email, world.admin.password)
    async with connect(primary, recorder, credentials=credentials) as client:
        yield client


@pytest_asyncio.fixture(loop_scope="session")
async def anonymous_client(
    primary: RunningServer, recorder: ResponseRecorder
) -> AsyncIterator[UsersvcClient]:
    async with connect(primary, recorder) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def short_ttl(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[RunningServer]:
    """A server whose access tokens live 30 seconds (the least allowed)."""
    settings = dataclasses.replace(e2e_settings, access_token_ttl_seconds=SHORT_TTL_SECONDS)
    async with running_server(settings, recorder) as running:
        yield running


# -- results and errors ---------------------------------------------------------------


async def test_a_user_signs_up_reads_itself_and_updates_with_its_etag(
    anonymous_client: UsersvcClient,
    primary: RunningServer,
    recorder: ResponseRecorder,
    world: World,
) -> None:
    email, password = new_email("client"), new_password(recorder)
    created = await anonymous_client.create_user(email, password, display_name="Ada")
    assert created.email == email
    assert created.state == user_pb2.User.STATE_ACTIVE

    async with connect(primary, recorder, credentials=PasswordLogin(email, password)) as ada:
        me = await ada.get_user()
        assert me.id == created.id
        updated = await ada.update_user(me.id, display_name="Ada Lovelace", etag=me.etag)
        assert updated.display_name == "Ada Lovelace"
        assert updated.etag != me.etag

        with pytest.raises(EtagMismatch) as info:
            await ada.update_user(me.id, display_name="Stale", etag=me.etag)
        assert info.value.reason == "ETAG_MISMATCH"
        assert info.value.code == grpc.StatusCode.ABORTED
        assert (await ada.get_user(me.id)).display_name == "Ada Lovelace"


async def test_a_missing_user_raises_user_not_found_with_the_echoed_request_id(
    admin: UsersvcClient,
) -> None:
    with pytest.raises(UserNotFound) as info:
        await admin.get_user(missing_id(), x_request_id="client-e2e-404")
    assert info.value.reason == "USER_NOT_FOUND"
    assert info.value.code == grpc.StatusCode.NOT_FOUND
    assert info.value.request_id == "client-e2e-404"


async def test_an_invalid_email_raises_invalid_argument_naming_the_field(
    anonymous_client: UsersvcClient, recorder: ResponseRecorder, world: World
) -> None:
    with pytest.raises(InvalidArgument) as info:
        await anonymous_client.create_user("not-an-email", new_password(recorder))
    assert type(info.value) is InvalidArgument
    assert [v.field for v in info.value.field_violations] == ["email"]
    assert all(isinstance(v, FieldViolation) and v.description for v in info.value.field_violations)


async def test_a_common_password_raises_weak_password(
    anonymous_client: UsersvcClient, world: World
) -> None:
    with pytest.raises(WeakPassword) as info:
        await anonymous_client.create_user(new_email("weak"), "password")
    assert [v.field for v in info.value.field_violations] == ["password"]


async def test_a_taken_email_raises_email_already_exists(
    admin: UsersvcClient, world: World, recorder: ResponseRecorder
) -> None:
    with pytest.raises(EmailAlreadyExists):
        await admin.create_user(world.alice.email, new_password(recorder))


async def test_a_plain_user_listing_users_is_denied(
    primary: RunningServer, world: World, recorder: ResponseRecorder
) -> None:
    async with connect(primary, recorder, credentials=StaticToken(world.alice.token)) as alice:
        with pytest.raises(PermissionDenied):
            await alice.list_users()


async def test_a_wrong_password_raises_invalid_credentials(
    primary: RunningServer, world: World, recorder: ResponseRecorder
) -> None:
    credentials = PasswordLogin(world.alice.email, "not her password")
    async with connect(primary, recorder, credentials=credentials) as client:
        with pytest.raises(InvalidCredentials):
            await client.get_user()


async def test_every_call_has_a_deadline_by_default(
    primary: RunningServer, world: World, recorder: ResponseRecorder, engine: AsyncEngine
) -> None:
    credentials = StaticToken(world.admin.token)
    async with (
        connect(primary, recorder, credentials=credentials, default_timeout=1.0) as client,
        row_locked(engine, world.bob.id),
    ):
        # Without a deadline this would wait for the lock as long as it is held.
        with pytest.raises(DeadlineExceeded):
            await client.update_user(world.bob.id, display_name="Too late")


async def test_create_batch_get_and_introspect_as_a_service(
    primary: RunningServer, world: World, recorder: ResponseRecorder
) -> None:
    credentials = PasswordLogin(world.service.email, world.service.password)
    async with connect(primary, recorder, credentials=credentials) as service:
        first = await service.create_user(new_email("svc"), new_password(recorder))
        second = await service.create_user(new_email("svc"), new_password(recorder))
        users = await service.batch_get_users([second.id, first.id])
        assert [u.id for u in users] == [second.id, first.id]
        introspected = await service.introspect_token(world.alice.token)
        assert introspected.active
        assert introspected.sub == world.alice.id


# -- pagination -------------------------------------------------------------------------


async def test_iter_users_walks_every_page(
    admin: UsersvcClient,
    world: World,
    counter: MethodCounter,
    primary: RunningServer,
    recorder: ResponseRecorder,
) -> None:
    emails = sorted(new_email("page") for _ in range(7))
    for email in emails:
        await world.seed_user(email=email, labels={"batch": "client-pages"})
    credentials = PasswordLogin(world.admin.email, world.admin.password)
    async with connect(primary, recorder, counter, credentials=credentials) as client:
        seen = [
            user.email
            async for user in client.iter_users(
                page_size=3, filter='labels.batch = "client-pages"', order_by="email"
            )
        ]
    assert seen == emails
    assert counter.calls["ListUsers"] == 3


# -- the login credential ------------------------------------------------------------------


async def test_the_login_credential_refreshes_shortly_before_the_token_expires(
    short_ttl: RunningServer,
    world: World,
    recorder: ResponseRecorder,
    counter: MethodCounter,
    clock: FakeClock,
) -> None:
    credentials = PasswordLogin(world.bob.email, world.bob.password, clock=clock)
    async with connect(short_ttl, recorder, counter, credentials=credentials) as bob:
        await bob.get_user()
        first_refresh_token = credentials.refresh_token
        assert counter.calls["Login"] == 1
        # A 30-second token is renewed after four fifths of its life.
        clock.now += SHORT_TTL_SECONDS * 0.8 - 0.5
        await bob.get_user()
        assert counter.calls["RefreshToken"] == 0
        clock.now += 0.5
        me = await bob.get_user()
        assert counter.calls["RefreshToken"] == 1
        assert counter.calls["Login"] == 1
        assert credentials.refresh_token != first_refresh_token
        assert me.id == world.bob.id


async def test_the_credentials_login_gets_only_what_is_left_of_the_calls_deadline(
    primary: RunningServer, world: World, recorder: ResponseRecorder
) -> None:
    timeouts = TimeoutRecorder()
    credentials = PasswordLogin(world.bob.email, world.bob.password)
    async with connect(
        primary, recorder, timeouts, credentials=credentials, default_timeout=60
    ) as bob:
        await bob.get_user(timeout=2)
    (login_timeout,) = timeouts.timeouts["Login"]
    assert login_timeout is not None
    assert 0 < login_timeout <= 2
    (get_timeout,) = timeouts.timeouts["GetUser"]
    assert get_timeout is not None
    # What the login took is not given to the call again.
    assert get_timeout < login_timeout


async def test_the_credentials_refresh_gets_only_what_is_left_of_the_calls_deadline(
    short_ttl: RunningServer,
    world: World,
    recorder: ResponseRecorder,
    clock: FakeClock,
) -> None:
    timeouts = TimeoutRecorder()
    credentials = PasswordLogin(world.bob.email, world.bob.password, clock=clock)
    async with connect(
        short_ttl, recorder, timeouts, credentials=credentials, default_timeout=60
    ) as bob:
        await bob.get_user()
        clock.now += SHORT_TTL_SECONDS
        await bob.get_user(timeout=1.5)
    (refresh_timeout,) = timeouts.timeouts["RefreshToken"]
    assert refresh_timeout is not None
    assert 0 < refresh_timeout <= 1.5


async def test_a_call_whose_deadline_has_passed_does_not_wait_for_a_login(
    primary: RunningServer, world: World, recorder: ResponseRecorder
) -> None:
    timeouts = TimeoutRecorder()
    credentials = PasswordLogin(world.bob.email, world.bob.password)
    async with connect(
        primary, recorder, timeouts, credentials=credentials, default_timeout=60
    ) as bob:
        with pytest.raises(DeadlineExceeded):
            await bob.get_user(timeout=0)
    assert timeouts.timeouts["Login"] == [0.0]
    assert "GetUser" not in timeouts.timeouts


async def test_twenty_concurrent_calls_share_one_refresh(
    short_ttl: RunningServer,
    world: World,
    recorder: ResponseRecorder,
    counter: MethodCounter,
    clock: FakeClock,
) -> None:
    credentials = PasswordLogin(world.bob.email, world.bob.password, clock=clock)
    async with connect(short_ttl, recorder, counter, credentials=credentials) as bob:
        await bob.get_user()
        clock.now += SHORT_TTL_SECONDS
        users = await asyncio.gather(*(bob.get_user() for _ in range(20)))
    assert {u.id for u in users} == {world.bob.id}
    # Two refreshes with one single-use token would have ended the session.
    assert counter.calls["RefreshToken"] == 1
    assert counter.calls["Login"] == 1
    assert counter.calls["GetUser"] == 21


async def test_a_refused_refresh_token_means_logging_in_again(
    short_ttl: RunningServer,
    world: World,
    recorder: ResponseRecorder,
    counter: MethodCounter,
    clock: FakeClock,
    admin: UsersvcClient,
) -> None:
    credentials = PasswordLogin(world.bob.email, world.bob.password, clock=clock)
    async with connect(short_ttl, recorder, counter, credentials=credentials) as bob:
        await bob.get_user()
        await admin.revoke_all_sessions(world.bob.id)
        clock.now += SHORT_TTL_SECONDS
        me = await bob.get_user()
    assert me.id == world.bob.id
    assert counter.calls["RefreshToken"] == 1
    assert counter.calls["Login"] == 2


async def test_a_revoked_token_is_renewed_and_the_call_made_once_more(
    primary: RunningServer,
    world: World,
    recorder: ResponseRecorder,
    counter: MethodCounter,
    admin: UsersvcClient,
) -> None:
    credentials = PasswordLogin(world.bob.email, world.bob.password)
    async with connect(primary, recorder, counter, credentials=credentials) as bob:
        await bob.get_user()
        await admin.revoke_all_sessions(world.bob.id)
        me = await bob.get_user()
    assert me.id == world.bob.id
    # Refused as TOKEN_REVOKED, the refresh token is dead too, so: log in.
    assert counter.calls["GetUser"] == 3
    assert counter.calls["RefreshToken"] == 1
    assert counter.calls["Login"] == 2


async def test_logout_ends_the_session_and_the_next_call_logs_in_again(
    primary: RunningServer, world: World, recorder: ResponseRecorder, counter: MethodCounter
) -> None:
    credentials = PasswordLogin(world.bob.email, world.bob.password)
    async with connect(primary, recorder, counter, credentials=credentials) as bob:
        await bob.get_user()
        refresh_token = credentials.refresh_token
        assert refresh_token is not None
        await bob.logout()
        assert credentials.refresh_token is None
        async with connect(primary, recorder) as anonymous:
            with pytest.raises(RefreshTokenInvalid):
                await anonymous.refresh_token(refresh_token)
        await bob.get_user()
    assert counter.calls["Login"] == 2


# -- TLS ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClientPki:
    ca: Authority
    server: Issued
    billing: Issued  # a service identity, mapped to the service role


@pytest.fixture(scope="module")
def client_pki(tmp_path_factory: pytest.TempPathFactory) -> ClientPki:
    ca = Authority.create(tmp_path_factory.mktemp("client-pki"), "corp")
    return ClientPki(ca, ca.server(), ca.client("billing", uris=(BILLING,)))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def tls_server(
    e2e_settings: Any, client_pki: ClientPki, recorder: ResponseRecorder
) -> AsyncIterator[RunningServer]:
    """Main port TLS (bearer tokens), second port mTLS (certificates)."""
    settings = dataclasses.replace(
        e2e_settings,
        tls_cert_file=client_pki.server.cert_file,
        tls_key_file=client_pki.server.key_file,
        tls_client_ca_file=client_pki.ca.cert_file,
        service_identities={BILLING: frozenset({"service"})},
        mtls_listen_addr="127.0.0.1:0",
    )
    async with running_server(settings, recorder) as running:
        yield running


async def test_a_service_identity_calls_over_mtls(
    tls_server: RunningServer, client_pki: ClientPki, world: World
) -> None:
    tls = TlsConfig.from_files(
        client_pki.ca.cert_file, client_pki.billing.cert_file, client_pki.billing.key_file
    )
    assert tls_server.server.mtls_port is not None
    async with UsersvcClient.connect(f"127.0.0.1:{tls_server.server.mtls_port}", tls=tls) as client:
        user = await client.lookup_user(world.alice.email)
        assert user.id == world.alice.id
        with pytest.raises(PermissionDenied):
            await client.disable_user(user.id)


async def test_a_user_logs_in_over_tls_trusting_the_servers_ca(
    tls_server: RunningServer, client_pki: ClientPki, world: World
) -> None:
    async with UsersvcClient.connect(
        f"localhost:{tls_server.server.port}",
        tls=TlsConfig.from_files(client_pki.ca.cert_file),
        credentials=PasswordLogin(world.alice.email, world.alice.password),
    ) as client:
        assert (await client.get_user()).id == world.alice.id


async def test_a_server_certificate_from_another_ca_is_refused(
    tls_server: RunningServer, tmp_path_factory: pytest.TempPathFactory, world: World
) -> None:
    stranger = Authority.create(tmp_path_factory.mktemp("stranger-ca"), "stranger")
    tls = TlsConfig.from_files(stranger.cert_file)
    async with UsersvcClient.connect(
        f"127.0.0.1:{tls_server.server.port}", tls=tls, default_timeout=5.0
    ) as client:
        with pytest.raises(Unavailable):
            await client.get_jwks()


async def test_creating_twice_with_one_request_id_creates_once(
    admin: UsersvcClient, world: World, recorder: ResponseRecorder
) -> None:
    email, password = new_email("idem"), new_password(recorder)
    first = await admin.create_user(email, password, request_id="client-idem-1")
    again = await admin.create_user(email, password, request_id="client-idem-1")
    assert again.id == first.id


async def test_an_admin_imports_users_in_batches_and_they_log_in(
    admin: UsersvcClient, world: World, recorder: ResponseRecorder
) -> None:
    password = new_password(recorder)
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()
    emails = [new_email("imported") for _ in range(3)]

    async def batches() -> AsyncIterator[list[user_service_pb2.ImportedUser]]:
        yield [user_service_pb2.ImportedUser(email=e, password_hash=hashed) for e in emails[:2]]
        yield [
            user_service_pb2.ImportedUser(email=emails[2], password_hash=hashed),
            user_service_pb2.ImportedUser(email=world.alice.email, password_hash=hashed),
        ]

    report = await admin.import_users(batches())
    assert report.imported_count == 3
    assert [(e.row, e.reason) for e in report.errors] == [(3, "EMAIL_ALREADY_EXISTS")]
    login = await admin.login(emails[2], password)
    assert login.user.email == emails[2]


async def test_a_plain_user_cannot_import(
    primary: RunningServer, world: World, recorder: ResponseRecorder
) -> None:
    async with connect(primary, recorder, credentials=StaticToken(world.alice.token)) as alice:
        with pytest.raises(PermissionDenied):
            await alice.import_users([[user_service_pb2.ImportedUser(email=new_email())]])
