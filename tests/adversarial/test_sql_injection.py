"""SQL injection payloads (tests/adversarial/payloads.py) everywhere a caller
can put text: every string field of every request, filter literals and
field names, order_by, and forged page-token cursors.

Each is treated as data: stored verbatim where the field accepts it, refused
with INVALID_ARGUMENT where it does not, never a database error. Every call
carries a deadline well below the payloads' pg_sleep, so an answer in time
proves no sleep ran; and the users table is intact afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from e2e.helpers import bearer, new_email
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc_protos.v1 import auth_service_pb2, user_pb2, user_service_pb2

from .payloads import SLEEP_SECONDS, SQL_PAYLOADS, survives_text_fields
from .rpcs import RPCS, Outcome, Rpc, call_raw, well_formed_problems
from .support import Cast, assert_consistent, count

_F = FieldDescriptor
# Far below the payloads' pg_sleep, far above any honest call.
DEADLINE_SECONDS = 3.0
assert SLEEP_SECONDS > DEADLINE_SECONDS
# Calls in flight at once: enough to be quick, few enough that a busy
# two-core machine answers each well within the deadline.
PARALLEL_CALLS = 8

TEXT_PAYLOADS = tuple(p for p in SQL_PAYLOADS if survives_text_fields(p))
CONTROL_PAYLOADS = tuple(p for p in SQL_PAYLOADS if not all(ch.isprintable() for ch in p))


def quoted(value: str) -> str:
    """An AIP-160 string literal holding ``value``."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


async def bounded(calls: list[Callable[[], Awaitable[Outcome]]]) -> list[Outcome]:
    slots = asyncio.Semaphore(PARALLEL_CALLS)

    async def one(call: Callable[[], Awaitable[Outcome]]) -> Outcome:
        async with slots:
            return await call()

    return list(await asyncio.gather(*(one(call) for call in calls)))


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class StringSlot:
    """Somewhere a string goes in a request: a field, an element of a
    repeated field, a map key or value; ``parents`` lead to it."""

    parents: tuple[tuple[str, bool], ...]  # (field name, repeated: use item 0)
    name: str
    kind: str  # "scalar", "repeated", "map key", "map value"

    def __str__(self) -> str:
        path = ".".join(f"{p}[0]" if repeated else p for p, repeated in self.parents)
        return f"{path + '.' if path else ''}{self.name} ({self.kind})"

    def put(self, message: Message, payload: str) -> None:
        target = message
        for name, repeated in self.parents:
            field = getattr(target, name)
            if repeated and not len(field):
                field.add()
            target = field[0] if repeated else field
        field = getattr(target, self.name)
        if self.kind == "scalar":
            setattr(target, self.name, payload)
        elif self.kind == "repeated":
            field.append(payload)
        elif self.kind == "map key":
            field[payload] = "v"
        else:
            field["note"] = payload


def string_slots(
    descriptor: Descriptor, parents: tuple[tuple[str, bool], ...] = ()
) -> Iterator[StringSlot]:
    """Every place in ``descriptor`` (nested messages included) that holds
    text, read from the descriptor so new fields are covered."""
    for fd in descriptor.fields:
        if fd.type == _F.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            key, value = (
                fd.message_type.fields_by_name["key"],
                fd.message_type.fields_by_name["value"],
            )
            if key.type == _F.TYPE_STRING:
                yield StringSlot(parents, fd.name, "map key")
            if value.type == _F.TYPE_STRING:
                yield StringSlot(parents, fd.name, "map value")
        elif fd.type == _F.TYPE_MESSAGE and len(parents) < 3:
            yield from string_slots(fd.message_type, (*parents, (fd.name, fd.is_repeated)))
        elif fd.type == _F.TYPE_STRING:
            yield StringSlot(parents, fd.name, "repeated" if fd.is_repeated else "scalar")


# --------------------------------------------------------------------------- bases


@dataclass
class Target:
    """A user made for one test to aim at (never a member of the cast)."""

    id: str
    email: str
    password: str
    etag: str
    refresh_token: str
    access_token: str


async def new_target(cast: Cast) -> Target:
    user_id, email, password = await cast.world.seed_user(email=new_email("target"))
    login = await cast.world.login(email, password)
    return Target(
        user_id, email, password, login.user.etag, login.refresh_token, login.access_token
    )


def valid_create(cast: Cast) -> user_service_pb2.CreateUserRequest:
    return user_service_pb2.CreateUserRequest(
        email=new_email("inj"),
        password=cast.password(),
        display_name="Base",
        labels={"note": "base"},
    )


# A well-formed bcrypt hash (cost 4) for ImportUsers rows.
IMPORT_HASH = "$2b$04$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"


def base_request(rpc: Rpc, cast: Cast, target: Target) -> Message:
    """A request of ``rpc`` that would succeed against ``target``, so that the
    payload is the only thing wrong with it. Methods added later start
    from an empty message."""
    builders: dict[str, Callable[[], Message]] = {
        "CreateUser": lambda: valid_create(cast),
        "BatchCreateUsers": lambda: user_service_pb2.BatchCreateUsersRequest(
            requests=[valid_create(cast)]
        ),
        "GetUser": lambda: user_service_pb2.GetUserRequest(id=target.id),
        "LookupUser": lambda: user_service_pb2.LookupUserRequest(email=target.email),
        "ListUsers": lambda: user_service_pb2.ListUsersRequest(page_size=5),
        "UpdateUser": lambda: user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(
                id=target.id,
                email=new_email("upd"),
                display_name="Updated",
                roles=["user"],
                labels={"note": "base"},
                etag=target.etag,
            )
        ),
        "DeleteUser": lambda: user_service_pb2.DeleteUserRequest(id=target.id, etag=target.etag),
        "UndeleteUser": lambda: user_service_pb2.UndeleteUserRequest(id=target.id),
        "PurgeUser": lambda: user_service_pb2.PurgeUserRequest(id=target.id),
        "DisableUser": lambda: user_service_pb2.DisableUserRequest(id=target.id),
        "EnableUser": lambda: user_service_pb2.EnableUserRequest(id=target.id),
        "ChangePassword": lambda: user_service_pb2.ChangePasswordRequest(
            id=target.id, new_password=cast.password()
        ),
        "BatchGetUsers": lambda: user_service_pb2.BatchGetUsersRequest(ids=[target.id]),
        "ImportUsers": lambda: user_service_pb2.ImportUsersRequest(
            users=[
                user_service_pb2.ImportedUser(
                    email=new_email("imp"),
                    password_hash=IMPORT_HASH,
                    display_name="Base",
                    labels={"note": "base"},
                )
            ]
        ),
        "Login": lambda: auth_service_pb2.LoginRequest(
            email=target.email, password=target.password
        ),
        "RefreshToken": lambda: auth_service_pb2.RefreshTokenRequest(
            refresh_token=target.refresh_token
        ),
        "Logout": lambda: auth_service_pb2.LogoutRequest(refresh_token=target.refresh_token),
        "RevokeAllSessions": lambda: auth_service_pb2.RevokeAllSessionsRequest(user_id=target.id),
        "GetJwks": auth_service_pb2.GetJwksRequest,
        "IntrospectToken": lambda: auth_service_pb2.IntrospectTokenRequest(
            token=target.access_token
        ),
    }
    build = builders.get(rpc.name, rpc.request_class())
    return build()


# --------------------------------------------------------------------------- checks


async def users_snapshot(engine: AsyncEngine) -> dict[str, int]:
    async with engine.connect() as connection:
        rows = await connection.execute(text("SELECT id::text, version FROM users"))
        return {row[0]: row[1] for row in rows}


async def assert_intact(cast: Cast, engine: AsyncEngine, before: dict[str, int]) -> None:
    """No user that existed before the payloads went in has vanished, the
    cast's own rows are untouched, and every rule of invariants.py holds."""
    after = await users_snapshot(engine)
    vanished = set(before) - set(after)
    assert not vanished, f"{len(vanished)} users vanished"
    for user_id in [cast.admin.id, *(victim[0] for victim in cast.victims)]:
        assert after[user_id] == before[user_id], f"user {user_id} changed"
    await assert_consistent(engine)


async def sleeping_statements(engine: AsyncEngine) -> int:
    """Connections of the service (by application_name) on this database
    whose last statement mentions pg_sleep: every payload travels as a bound
    parameter, so none ever should."""
    async with engine.connect() as connection:
        found = await connection.execute(
            text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND application_name = 'usersvc' AND pid <> pg_backend_pid() "
                "AND query ILIKE '%pg_sleep%'"
            )
        )
        return int(found.scalar_one())


def problems_of(outcomes: list[Outcome], labels: list[str]) -> list[str]:
    found = []
    for outcome, label in zip(outcomes, labels, strict=True):
        count("injection payloads", outcome)
        found.extend(f"{label}: {p}" for p in well_formed_problems(outcome))
    return found


# --------------------------------------------------------------------------- every field


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_payloads_in_every_string_field_are_data_never_sql(
    rpc: Rpc, cast: Cast, engine: AsyncEngine
) -> None:
    before = await users_snapshot(engine)
    target = await new_target(cast)
    # An admin of its own: Logout or RevokeAllSessions must not end the
    # session the rest of the module calls with.
    caller = await cast.world.account(f"injector-{rpc.name.lower()}", roles=("user", "admin"))
    slots = list(string_slots(rpc.input))
    calls, labels = [], []
    for slot in slots:
        for payload in SQL_PAYLOADS:
            request = base_request(rpc, cast, target)
            slot.put(request, payload)
            body = request.SerializeToString()
            calls.append(
                lambda body=body: call_raw(
                    cast.channel,
                    rpc,
                    body,
                    metadata=bearer(caller.login.access_token),
                    deadline_seconds=DEADLINE_SECONDS,
                )
            )
            labels.append(f"{slot} = {payload!r}")

    outcomes = await bounded(calls)

    assert not problems_of(outcomes, labels)
    assert await sleeping_statements(engine) == 0
    await assert_intact(cast, engine, before)


def test_string_slots_reach_nested_repeated_and_map_fields() -> None:
    """The injection points come from the descriptors, nested messages,
    repeated fields and map keys and values included."""
    create = {str(s) for s in string_slots(user_service_pb2.CreateUserRequest.DESCRIPTOR)}
    update = {str(s) for s in string_slots(user_service_pb2.UpdateUserRequest.DESCRIPTOR)}

    assert {
        "email (scalar)",
        "labels (map key)",
        "labels (map value)",
        "roles (repeated)",
    } <= create
    assert {"user.display_name (scalar)", "update_mask.paths (repeated)"} <= update


# --------------------------------------------------------------------------- stored verbatim


async def test_display_names_round_trip_byte_for_byte(cast: Cast, engine: AsyncEngine) -> None:
    created = await asyncio.gather(
        *(
            cast.admin.users.CreateUser(
                user_service_pb2.CreateUserRequest(
                    email=new_email("dn"), password=cast.password(), display_name=payload
                ),
                timeout=DEADLINE_SECONDS,
            )
            for payload in TEXT_PAYLOADS
        )
    )

    async with engine.connect() as connection:
        for payload, response in zip(TEXT_PAYLOADS, created, strict=True):
            assert response.user.display_name == payload
            fetched = await cast.admin.users.GetUser(
                user_service_pb2.GetUserRequest(id=response.user.id)
            )
            assert fetched.user.display_name == payload
            stored = await connection.execute(
                text("SELECT display_name FROM users WHERE id = CAST(:id AS uuid)"),
                {"id": response.user.id},
            )
            assert stored.scalar_one() == payload


async def test_display_names_updated_to_payloads_round_trip_byte_for_byte(cast: Cast) -> None:
    target = await new_target(cast)
    for payload in TEXT_PAYLOADS:
        updated = await cast.admin.users.UpdateUser(
            user_service_pb2.UpdateUserRequest(
                user=user_pb2.User(id=target.id, display_name=payload),
                update_mask={"paths": ["display_name"]},
            ),
            timeout=DEADLINE_SECONDS,
        )
        assert updated.user.display_name == payload


async def test_label_values_round_trip_byte_for_byte(cast: Cast) -> None:
    response = await cast.admin.users.CreateUser(
        user_service_pb2.CreateUserRequest(
            email=new_email("labels"),
            password=cast.password(),
            labels={f"p{index}": payload for index, payload in enumerate(TEXT_PAYLOADS)},
        ),
        timeout=DEADLINE_SECONDS,
    )

    fetched = await cast.admin.users.GetUser(user_service_pb2.GetUserRequest(id=response.user.id))
    assert dict(fetched.user.labels) == {f"p{i}": p for i, p in enumerate(TEXT_PAYLOADS)}


@pytest.mark.parametrize("payload", CONTROL_PAYLOADS, ids=repr)
async def test_display_names_with_control_characters_are_invalid_argument(
    cast: Cast, payload: str
) -> None:
    outcome = await call_raw(
        cast.channel,
        next(r for r in RPCS if r.name == "CreateUser"),
        user_service_pb2.CreateUserRequest(
            email=new_email("ctl"), password=cast.password(), display_name=payload
        ).SerializeToString(),
        metadata=bearer(cast.admin.login.access_token),
        deadline_seconds=DEADLINE_SECONDS,
    )

    assert not well_formed_problems(outcome)
    assert (outcome.code, outcome.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert outcome.failure is not None
    assert "display_name" in outcome.failure.violation_fields


# Payload-shaped local parts that are nevertheless valid addresses.
EMAIL_LOCAL_PARTS = ("o'reilly", "x'or'1'='1", "%", "_", "$$", "a--b", "/*x*/", "'--", "{}", "#")


async def test_payload_shaped_emails_are_stored_and_found_verbatim(cast: Cast) -> None:
    tag = secrets.token_hex(3)
    for local in EMAIL_LOCAL_PARTS:
        email = f"{local}-{tag}@Example.com"
        created = await cast.admin.users.CreateUser(
            user_service_pb2.CreateUserRequest(email=email, password=cast.password()),
            timeout=DEADLINE_SECONDS,
        )
        assert created.user.email == email.lower()
        found = await cast.admin.users.LookupUser(
            user_service_pb2.LookupUserRequest(email=email.upper()), timeout=DEADLINE_SECONDS
        )
        assert found.user.id == created.user.id


@pytest.mark.parametrize("pattern", ["a_{tag}@example.com", "%{tag}@example.com", "ab{tag}@%"])
async def test_lookup_treats_like_wildcards_as_plain_characters(cast: Cast, pattern: str) -> None:
    tag = secrets.token_hex(3)
    await cast.world.seed_user(email=f"ab{tag}@example.com")

    outcome = await call_raw(
        cast.channel,
        next(r for r in RPCS if r.name == "LookupUser"),
        user_service_pb2.LookupUserRequest(email=pattern.format(tag=tag)).SerializeToString(),
        metadata=bearer(cast.admin.login.access_token),
        deadline_seconds=DEADLINE_SECONDS,
    )

    assert not well_formed_problems(outcome)
    assert outcome.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


async def test_payload_passwords_work_exactly_as_typed(cast: Cast) -> None:
    usable = [p for p in SQL_PAYLOADS if 8 <= len(p.encode()) <= 72]
    for password in usable:
        _, email, _ = await cast.world.seed_user(password=password)
        login = await cast.world.login(email, password)
        assert login.user.email == email
        wrong = "' OR '1'='1" if password != "' OR '1'='1" else "' OR 1=1 --"
        outcome = await call_raw(
            cast.channel,
            next(r for r in RPCS if r.name == "Login"),
            auth_service_pb2.LoginRequest(email=email, password=wrong).SerializeToString(),
            deadline_seconds=DEADLINE_SECONDS,
        )
        assert (outcome.code, outcome.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_CREDENTIALS",
        )


async def test_login_with_injection_in_the_email_logs_nobody_in(cast: Cast) -> None:
    emails = [
        *SQL_PAYLOADS,
        f"{cast.admin.email}' --",
        f"{cast.admin.email}'; --",
        f"' OR email = '{cast.admin.email}",
        f"{cast.admin.email}\x00",
    ]
    login = next(r for r in RPCS if r.name == "Login")
    outcomes = await bounded(
        [
            lambda email=email: call_raw(
                cast.channel,
                login,
                auth_service_pb2.LoginRequest(
                    email=email, password="' OR '1'='1"
                ).SerializeToString(),
                deadline_seconds=DEADLINE_SECONDS,
            )
            for email in emails
        ]
    )

    assert not problems_of(outcomes, emails)
    assert {(o.code, o.reason) for o in outcomes} == {
        (grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS")
    }


# --------------------------------------------------------------------------- filters


async def list_ids(cast: Cast, **fields: Any) -> Outcome:
    return await call_raw(
        cast.channel,
        next(r for r in RPCS if r.name == "ListUsers"),
        user_service_pb2.ListUsersRequest(page_size=1000, **fields).SerializeToString(),
        metadata=bearer(cast.admin.login.access_token),
        deadline_seconds=DEADLINE_SECONDS,
    )


def listed(outcome: Outcome) -> set[str]:
    assert outcome.ok, outcome.describe()
    assert outcome.response is not None
    response = user_service_pb2.ListUsersResponse.FromString(outcome.response)
    return {user.id for user in response.users}


@pytest.fixture(scope="module")
def run_tag() -> str:
    return secrets.token_hex(4)


async def seed_named(cast: Cast, run_tag: str) -> dict[str, str]:
    """One user per text payload, named after it and labelled with the run."""
    ids = {}
    for payload in TEXT_PAYLOADS:
        user_id, _, _ = await cast.world.seed_user(display_name=payload, labels={"run": run_tag})
        ids[payload] = user_id
    return ids


async def test_filter_literals_match_exactly_the_users_holding_them(
    cast: Cast, run_tag: str
) -> None:
    ids = await seed_named(cast, run_tag)
    scope = f"labels.run = {quoted(run_tag)} AND "

    for payload in TEXT_PAYLOADS:
        equal = await list_ids(cast, filter=f"{scope}display_name = {quoted(payload)}")
        contains = await list_ids(cast, filter=f"{scope}display_name:{quoted(payload)}")

        assert listed(equal) == {ids[payload]}, payload
        assert listed(contains) == {i for name, i in ids.items() if payload in name}, payload


@pytest.mark.parametrize("payload", SQL_PAYLOADS, ids=repr)
async def test_filter_email_and_label_literals_are_data(cast: Cast, payload: str) -> None:
    filters = [
        f"email = {quoted(payload)}",
        f"email:{quoted(payload)}",
        f"email >= {quoted(payload)}",
        f"labels.note = {quoted(payload)}",
        f"labels:{quoted(payload)}",
        f"roles:{quoted(payload)}",
        f"create_time > {quoted(payload)}",
    ]
    outcomes = [await list_ids(cast, filter=f) for f in filters]

    assert not problems_of(outcomes, filters)
    assert {o.code for o in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


@pytest.mark.parametrize("payload", SQL_PAYLOADS, ids=repr)
async def test_payloads_as_filter_syntax_or_field_names_are_refused_or_harmless(
    cast: Cast, payload: str
) -> None:
    filters = [
        payload,
        f"{payload} = {quoted('x')}",
        f"display_name = {payload}",
        f"email = {quoted('x')} AND {payload}",
        f"email = {quoted('x')} {payload}",
        f"labels.{payload} = {quoted('x')}",
    ]
    outcomes = [await list_ids(cast, filter=f) for f in filters]

    assert not problems_of(outcomes, filters)
    for text_, outcome in zip(filters, outcomes, strict=True):
        if outcome.ok:
            # Whatever parsed names no user: nothing holds the literal "x".
            assert listed(outcome) == set(), text_
        else:
            assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (text_, outcome.describe())


@pytest.mark.parametrize("payload", SQL_PAYLOADS, ids=repr)
async def test_payloads_in_order_by_are_invalid_argument(cast: Cast, payload: str) -> None:
    orders = [payload, f"email {payload}", f"email,{payload}", f"{payload} desc"]
    outcomes = [await list_ids(cast, order_by=o) for o in orders]

    assert not problems_of(outcomes, orders)
    for order, outcome in zip(orders, outcomes, strict=True):
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (order, outcome.describe())
        assert outcome.failure is not None
        assert outcome.failure.violation_fields == ["order_by"]


# --------------------------------------------------------------------------- page tokens


# Page tokens are a 32-byte HMAC tag and JSON. These tests tag their
# forgeries with the server's own key, as an attacker holding it would: what
# is tested is that even an authentic token's cursor stays data.
TAG_BYTES = 32


def decode_token(token: str) -> dict[str, Any]:
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    body: dict[str, Any] = json.loads(raw[TAG_BYTES:])
    return body


def encode_token(cast: Cast, body: dict[str, Any]) -> str:
    key = cast.server.container.tokens.key_ring.page_token_keys[0]
    data = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    tagged = hmac.new(key, data, hashlib.sha256).digest() + data
    return base64.urlsafe_b64encode(tagged).rstrip(b"=").decode()


async def real_token(cast: Cast, order_by: str) -> str:
    page = await cast.admin.users.ListUsers(
        user_service_pb2.ListUsersRequest(page_size=1, order_by=order_by)
    )
    assert page.next_page_token
    return str(page.next_page_token)


@pytest.mark.parametrize("order_by", ["display_name", "email desc", "create_time"])
async def test_forged_cursor_values_in_page_tokens_are_data(cast: Cast, order_by: str) -> None:
    """The token's own format with a payload as the cursor's sort value:
    the page after that value, or INVALID_ARGUMENT; never SQL."""
    body = decode_token(await real_token(cast, order_by))
    tokens = []
    for payload in SQL_PAYLOADS:
        forged = dict(body, k=[payload, body["k"][1]])
        tokens.append(encode_token(cast, forged))

    outcomes = [await list_ids(cast, order_by=order_by, page_token=t) for t in tokens]

    assert not problems_of(outcomes, list(SQL_PAYLOADS))
    assert {o.code for o in outcomes} <= {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}
    if order_by.startswith("display_name"):
        # Text cursors are data: a printable payload is a valid place to resume.
        texts = [o for p, o in zip(SQL_PAYLOADS, outcomes, strict=True) if p in TEXT_PAYLOADS]
        assert all(o.ok for o in texts), [o.describe() for o in texts if not o.ok]


@pytest.mark.parametrize("key", ["k.id", "f", "t", "v", "whole"])
async def test_payloads_elsewhere_in_page_tokens_are_invalid_argument(cast: Cast, key: str) -> None:
    body = decode_token(await real_token(cast, "email"))
    tokens = []
    for payload in SQL_PAYLOADS:
        if key == "whole":
            tokens.append(payload)
        elif key == "k.id":
            tokens.append(encode_token(cast, dict(body, k=[body["k"][0], payload])))
        else:
            tokens.append(encode_token(cast, dict(body, **{key: payload})))

    outcomes = [await list_ids(cast, order_by="email", page_token=t) for t in tokens]

    assert not problems_of(outcomes, list(SQL_PAYLOADS))
    for payload, outcome in zip(SQL_PAYLOADS, outcomes, strict=True):
        assert outcome.code is grpc.StatusCode.INVALID_ARGUMENT, (payload, outcome.describe())
        assert outcome.failure is not None
        assert outcome.failure.violation_fields == ["page_token"]


async def test_the_users_table_is_intact_after_all_payloads(
    cast: Cast, engine: AsyncEngine
) -> None:
    """Runs last in this module: the cast's rows are there, unchanged by
    anything but their own logins, and every invariant holds."""
    snapshot = await users_snapshot(engine)
    assert cast.admin.id in snapshot
    assert all(victim[0] in snapshot for victim in cast.victims)
    assert await sleeping_statements(engine) == 0
    await assert_consistent(engine)
