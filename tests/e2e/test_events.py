"""Lifecycle events end to end: real RPCs on a server publishing to the
shared NATS JetStream; the same events from ListEvents, WatchEvents and
the stream, in the same order, with the CloudEvents headers; only admins
and services may read them; no secret anywhere in them.

Other test runs may publish to the same stream at the same time (the
subjects are fixed by the contract): this module's server has a CloudEvents
source of its own, and the consumer keeps only the messages with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import nats
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from log_secrets import SWEEP
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats_servers import shared_nats_url
from sqlalchemy import text

from usersvc_protos.v1 import auth_service_pb2, event_service_pb2, user_pb2, user_service_pb2

from .conftest import RunningServer, running_server
from .helpers import (
    Caller,
    ResponseRecorder,
    World,
    create_request,
    expect_denied,
    expect_invalid,
    expect_token_invalid,
    new_email,
)

STREAM = "USERSVC_EVENTS"
WAIT_SECONDS = 30.0


@dataclasses.dataclass
class Publishing:
    server: RunningServer
    nats_url: str
    source: str


@pytest_asyncio.fixture(loop_scope="session")
async def publishing(e2e_settings: Any, recorder: ResponseRecorder) -> AsyncIterator[Publishing]:
    """A server that publishes its events to the shared NATS, under a
    CloudEvents source no other run uses."""
    nats_url = shared_nats_url()
    source = f"usersvc-e2e-{uuid.uuid4().hex[:12]}"
    settings = dataclasses.replace(e2e_settings, nats_url=nats_url, event_source=source)
    async with running_server(settings, recorder) as running:
        yield Publishing(running, nats_url, source)


@pytest_asyncio.fixture(loop_scope="session")
async def people(publishing: Publishing, recorder: ResponseRecorder, clean_db: Any) -> World:
    return await World(
        user_service=publishing.server.container.user_service,
        channel=publishing.server.channel,
        recorder=recorder,
    ).populate()


async def _list_all(caller: Caller, **request: Any) -> list[event_service_pb2.Event]:
    events: list[event_service_pb2.Event] = []
    token = ""
    while True:
        page = await caller.events.ListEvents(
            event_service_pb2.ListEventsRequest(page_size=7, page_token=token, **request)
        )
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


async def _settled(caller: Caller, count: int) -> list[event_service_pb2.Event]:
    """The events once at least ``count`` are numbered (polls ListEvents)."""
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while True:
        events = await _list_all(caller)
        if len(events) >= count:
            return events
        assert asyncio.get_running_loop().time() < deadline, f"only {len(events)} events"
        await asyncio.sleep(0.05)


async def _until_disabled(call: Any, user_id: str) -> list[event_service_pb2.Event]:
    """The events of a watch up to the first that disables ``user_id``."""
    received = []
    async for response in call:
        received.append(response.event)
        if response.event.type == "usersvc.user.disabled.v1" and (
            response.event.user_id == user_id
        ):
            call.cancel()
            break
    return received


async def _watch(caller: Caller, count: int, **request: Any) -> list[event_service_pb2.Event]:
    call = caller.events.WatchEvents(
        event_service_pb2.WatchEventsRequest(**request), timeout=WAIT_SECONDS
    )
    received = []
    async for response in call:
        received.append(response.event)
        if len(received) == count:
            call.cancel()
            break
    return received


async def _from_stream(nats_url: str, source: str, ids: set[str]) -> list[Any]:
    """The messages of ``source`` on the stream, until all of ``ids`` came."""
    client = await nats.connect(nats_url)
    try:
        js = client.jetstream()
        sub = await js.subscribe(
            "usersvc.>",
            stream=STREAM,
            ordered_consumer=True,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
        )
        mine: list[Any] = []
        seen: set[str] = set()
        try:
            while not ids <= seen:
                message = await sub.next_msg(timeout=WAIT_SECONDS)
                if (message.headers or {}).get("ce-source") == source:
                    mine.append(message)
                    seen.add(message.headers["ce-id"])
        finally:
            await sub.unsubscribe()  # also ends the consumer's heartbeat task
        return mine
    finally:
        await client.close()


async def _make_every_kind_of_event(people: World, max_failures: int) -> str:
    """Real RPCs that cause every event type; returns the id of the user
    they are mostly about."""
    admin, anonymous = people.admin, people.anonymous
    password = "Correct-horse-battery-9"
    SWEEP.ledger.add("password", password)
    created = await admin.users.CreateUser(create_request(people.recorder, password=password))
    user = created.user
    await admin.users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=user.id, display_name="Dora", etag=user.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )

    async def login() -> auth_service_pb2.LoginResponse:
        response = await anonymous.auth.Login(
            auth_service_pb2.LoginRequest(email=user.email, password=password)
        )
        SWEEP.ledger.add_message(response)
        return response  # type: ignore[no-any-return]

    await login()
    # Disabling ends the session that login started.
    await admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=user.id))
    await admin.users.EnableUser(user_service_pb2.EnableUserRequest(id=user.id))
    first = await login()
    refreshed = await anonymous.auth.RefreshToken(
        auth_service_pb2.RefreshTokenRequest(refresh_token=first.refresh_token)
    )
    SWEEP.ledger.add_message(refreshed)
    # The retired token again: reuse, which revokes the session.
    with pytest.raises(grpc.aio.AioRpcError):
        await anonymous.auth.RefreshToken(
            auth_service_pb2.RefreshTokenRequest(refresh_token=first.refresh_token)
        )
    with pytest.raises(grpc.aio.AioRpcError):
        await anonymous.auth.Login(
            auth_service_pb2.LoginRequest(email=new_email("nobody"), password=password)
        )
    # Wrong passwords until the account locks, then one during the lock.
    for _ in range(max_failures):
        with pytest.raises(grpc.aio.AioRpcError):
            await anonymous.auth.Login(
                auth_service_pb2.LoginRequest(email=user.email, password="Wrong-password-1")
            )
    with pytest.raises(grpc.aio.AioRpcError):
        await login()
    await admin.users.ChangePassword(
        user_service_pb2.ChangePasswordRequest(id=user.id, new_password=password + "x")
    )
    SWEEP.ledger.add("password", password + "x")
    await people.alice.auth.RevokeAllSessions(
        auth_service_pb2.RevokeAllSessionsRequest(user_id="me")
    )
    await people.bob.auth.Logout(auth_service_pb2.LogoutRequest())
    current = (await admin.users.GetUser(user_service_pb2.GetUserRequest(id=user.id))).user
    await admin.users.DeleteUser(user_service_pb2.DeleteUserRequest(id=user.id, etag=current.etag))
    await admin.users.UndeleteUser(user_service_pb2.UndeleteUserRequest(id=user.id))
    code = await admin.users.CreateEmailVerificationCode(
        user_service_pb2.CreateEmailVerificationCodeRequest(id=user.id)
    )
    await admin.users.VerifyEmail(user_service_pb2.VerifyEmailRequest(id=user.id, code=code.code))
    reset = await admin.users.CreatePasswordResetCode(
        user_service_pb2.CreatePasswordResetCodeRequest(email=user.email)
    )
    SWEEP.ledger.add("password", password + "y")
    await anonymous.users.ResetPassword(
        user_service_pb2.ResetPasswordRequest(
            email=user.email, code=reset.code, new_password=password + "y"
        )
    )
    await admin.users.BatchCreateUsers(
        user_service_pb2.BatchCreateUsersRequest(
            requests=[create_request(people.recorder) for _ in range(2)]
        )
    )
    await admin.users.PurgeUser(user_service_pb2.PurgeUserRequest(id=user.id))
    return str(user.id)


EVERY_TYPE = {
    "usersvc.user.created.v1",
    "usersvc.user.updated.v1",
    "usersvc.user.deleted.v1",
    "usersvc.user.undeleted.v1",
    "usersvc.user.purged.v1",
    "usersvc.user.disabled.v1",
    "usersvc.user.enabled.v1",
    "usersvc.user.password_changed.v1",
    "usersvc.user.password_reset.v1",
    "usersvc.user.email_verified.v1",
    "usersvc.auth.login_succeeded.v1",
    "usersvc.auth.login_failed.v1",
    "usersvc.auth.account_locked.v1",
    "usersvc.auth.session_revoked.v1",
    "usersvc.auth.refresh_token_reused.v1",
}


async def test_every_change_reaches_list_watch_and_jetstream_in_the_same_order(
    publishing: Publishing, people: World
) -> None:
    settings = publishing.server.container.settings
    user_id = await _make_every_kind_of_event(people, settings.login_max_failures)
    admin = people.admin
    events = await _settled(admin, 1)
    # Everything is numbered once the purge (the last change) is.
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while events[-1].type != "usersvc.user.purged.v1":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
        events = await _list_all(admin)
    assert {e.type for e in events} >= EVERY_TYPE
    assert [e.sequence for e in events] == list(range(1, len(events) + 1))

    about_user = [e for e in events if e.user_id == user_id]
    kinds = [e.type for e in about_user]
    assert kinds[0] == "usersvc.user.created.v1"
    assert kinds[-1] == "usersvc.user.purged.v1"
    updated = next(e for e in about_user if e.type == "usersvc.user.updated.v1")
    assert list(updated.changed_fields) == ["display_name"]
    assert updated.user.display_name == "Dora"
    assert updated.actor == admin.id
    assert updated.request_id
    causes = [e.attributes["cause"] for e in events if e.type == "usersvc.auth.login_failed.v1"]
    assert {"unknown_email", "wrong_password", "locked"} <= set(causes)
    unknown = next(e for e in events if e.attributes.get("cause") == "unknown_email")
    assert (unknown.user_id, unknown.HasField("user")) == ("", False)
    purged = about_user[-1]
    assert not purged.HasField("user")
    reasons = {
        e.attributes["reason"] for e in events if e.type == "usersvc.auth.session_revoked.v1"
    }
    assert {"disabled", "refresh_token_reuse", "revoke_all", "logout"} <= reasons
    created = [e for e in events if e.type == "usersvc.user.created.v1"]
    assert len(created) == 4 + 1 + 2  # the world, the user, the batch

    watched = await _watch(admin, len(events))
    assert [e.id for e in watched] == [e.id for e in events]

    ids = {e.id for e in events}
    messages = await _from_stream(publishing.nats_url, publishing.source, ids)
    decoded = [event_service_pb2.Event.FromString(m.data) for m in messages]
    assert [e.id for e in decoded] == [e.id for e in events]
    assert decoded == list(events)
    for message, event in zip(messages, decoded, strict=True):
        assert message.subject == event.type
        headers = message.headers
        assert headers["Nats-Msg-Id"] == headers["ce-id"] == event.id
        assert headers["ce-specversion"] == "1.0"
        assert headers["ce-type"] == event.type
        assert headers["ce-subject"] == event.user_id
        assert headers["ce-sequence"] == str(event.sequence)
        assert headers["content-type"] == "application/protobuf"
        SWEEP.add_text("nats message", message.data)
        SWEEP.add_text("nats headers", repr(headers))

    # The secret sweep (an autouse fixture) reads what is added here.
    engine = publishing.server.container.engine
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT CAST(events AS text) FROM events"))).scalars()
        for row in rows:
            SWEEP.add_text("events table", row)


async def test_a_filter_selects_events_and_a_token_resumes_it(
    publishing: Publishing, people: World
) -> None:
    await people.admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=people.bob.id))
    await _settled(people.admin, 5)
    request = {"filter": f'type = "usersvc.user.disabled.v1" AND user_id = "{people.bob.id}"'}
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while not (found := await _list_all(people.service, **request)):
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    assert [(e.type, e.user_id) for e in found] == [("usersvc.user.disabled.v1", people.bob.id)]
    watched = await _watch(people.service, 1, **request)
    assert [e.id for e in watched] == [found[0].id]


async def test_plain_users_may_not_read_events_and_anonymous_callers_must_authenticate(
    publishing: Publishing, people: World
) -> None:
    alice = people.alice
    await expect_denied(alice.events.ListEvents(event_service_pb2.ListEventsRequest()))
    await expect_denied(_first(alice.events.WatchEvents(event_service_pb2.WatchEventsRequest())))
    anonymous = people.anonymous
    await expect_token_invalid(anonymous.events.ListEvents(event_service_pb2.ListEventsRequest()))
    watch = anonymous.events.WatchEvents(event_service_pb2.WatchEventsRequest())
    await expect_token_invalid(_first(watch))


async def _first(call: Any) -> Any:
    async for response in call:
        return response
    return None


async def test_bad_requests_are_invalid_arguments(publishing: Publishing, people: World) -> None:
    admin = people.admin
    await expect_invalid(
        admin.events.ListEvents(event_service_pb2.ListEventsRequest(filter="colour = 1")),
        "filter",
    )
    await expect_invalid(
        admin.events.ListEvents(event_service_pb2.ListEventsRequest(page_size=5000)),
        "page_size",
    )
    await expect_invalid(
        admin.events.ListEvents(event_service_pb2.ListEventsRequest(page_token="nonsense")),
        "page_token",
    )
    await expect_invalid(
        admin.events.ListEvents(event_service_pb2.ListEventsRequest(after_sequence=-1)),
        "after_sequence",
    )
    watch = admin.events.WatchEvents(event_service_pb2.WatchEventsRequest(filter='user_id = "x"'))
    await expect_invalid(_first(watch), "filter")


async def test_a_watch_sees_a_new_event_soon_after_its_commit_on_another_replica(
    publishing: Publishing, people: World, replica: RunningServer
) -> None:
    await _settled(people.admin, 4)
    last = (await _list_all(people.admin))[-1].sequence
    watcher = Caller(replica.channel, people.admin.token, "admin on the replica")
    call = watcher.events.WatchEvents(
        event_service_pb2.WatchEventsRequest(after_sequence=last), timeout=WAIT_SECONDS
    )
    disabled = asyncio.ensure_future(_until_disabled(call, people.bob.id))
    await people.admin.users.DisableUser(user_service_pb2.DisableUserRequest(id=people.bob.id))
    received = await disabled
    # Events committed before the read of ``last`` but numbered after it (a
    # fixture's login, say) may come first: every one in order, no gap, and
    # the disable among them.
    assert [event.sequence for event in received] == list(range(last + 1, last + 1 + len(received)))
    assert received[-1].type == "usersvc.user.disabled.v1"


async def test_watches_that_reach_their_deadline_end_and_give_back_their_connections(
    publishing: Publishing, people: World
) -> None:
    for _ in range(10):
        call = people.admin.events.WatchEvents(event_service_pb2.WatchEventsRequest(), timeout=0.3)
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in call:
                pass
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    pool: Any = publishing.server.container.engine.pool
    deadline = asyncio.get_running_loop().time() + WAIT_SECONDS
    while pool.checkedout() > 0:
        assert asyncio.get_running_loop().time() < deadline, "a watch kept its connection"
        await asyncio.sleep(0.05)


async def test_stopping_the_server_ends_open_watches_without_waiting_for_the_grace_period(
    e2e_settings: Any, recorder: ResponseRecorder, people: World
) -> None:
    settings = dataclasses.replace(e2e_settings, shutdown_grace_seconds=30.0)
    async with running_server(settings, recorder) as running:
        watcher = Caller(running.channel, people.admin.token, "admin")
        call = watcher.events.WatchEvents(
            event_service_pb2.WatchEventsRequest(), timeout=WAIT_SECONDS
        )
        assert await _first(call) is not None  # the backlog: the stream is open
        stopping = asyncio.ensure_future(running.server.stop(30.0))
        async for _ in call:
            pass
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, 10)
