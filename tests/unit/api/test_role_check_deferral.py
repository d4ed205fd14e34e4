"""The re-check of a privileged token's roles (usersvc.domain.role_checks)
through the real interceptors and servicer: on GetUser, LookupUser,
BatchGetUsers and ListUsers it is handed to the call's own read instead of costing a read
of its own, and whatever path the call takes, it is settled before the call
answers. The read lane's side (one statement) is in
tests/integration/test_read_lane.py."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2

from usersvc_protos.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from usersvc.domain import errors
from usersvc.domain.models import Principal, PrincipalKind, User
from usersvc.domain.role_checks import RoleCheck

from .support import (
    CALLER_ID,
    FakeAuthService,
    FakeUserService,
    bearer,
    only_error_info,
    rich_status_from_metadata,
    start_server,
)

ADMIN_TOKEN = "admin.access.token"
ADMIN = Principal(
    kind=PrincipalKind.USER,
    subject=CALLER_ID,
    roles=frozenset({"user", "admin"}),
    session_id="s2",
)


class DeferringAuthService(FakeAuthService):
    """Knows an admin token too, whose re-check passes while
    ``account_backs_token``; counts the checks it makes with a read of their
    own."""

    def __init__(self) -> None:
        super().__init__()
        self.account_backs_token = True
        self.own_reads = 0

    def authenticate(self, token: str) -> Principal:
        if token != ADMIN_TOKEN:
            return super().authenticate(token)
        check = RoleCheck.of(ADMIN)
        self._read(check)
        check.ensure_passed()
        return ADMIN

    async def authenticate_deferring_role_check(
        self, token: str
    ) -> tuple[Principal, RoleCheck | None]:
        if token != ADMIN_TOKEN:
            return super().authenticate(token), None
        return ADMIN, RoleCheck.of(ADMIN)

    async def settle_role_check(self, role_check: RoleCheck) -> None:
        if not role_check.done:
            self._read(role_check)
        role_check.ensure_passed()

    def _read(self, check: RoleCheck) -> None:
        self.own_reads += 1
        backs = self.account_backs_token
        check.settle(active=True, roles=("user", "admin") if backs else ("user",))


@dataclass
class ReadingUserService(FakeUserService):
    """Settles the check it is handed as the read lane would, in its read;
    an ``error`` ends the call before that read."""

    account_backs_token: bool = True

    async def lookup_user(
        self, *, principal: Principal, email: str, role_check: RoleCheck | None = None
    ) -> User:
        user = await super().lookup_user(principal=principal, email=email, role_check=role_check)
        if role_check is not None:
            backs = self.account_backs_token
            role_check.settle(active=True, roles=("user", "admin") if backs else ("user",))
        return user


@dataclass
class Served:
    users: ReadingUserService
    auth: DeferringAuthService
    stub: user_service_pb2_grpc.UserServiceStub


@pytest_asyncio.fixture
async def served() -> AsyncIterator[Served]:
    auth = DeferringAuthService()
    users = ReadingUserService()
    server, port, _ = await start_server(auth, users=users)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(users, auth, user_service_pb2_grpc.UserServiceStub(channel))
    await server.stop(None)


def lookup(stub: user_service_pb2_grpc.UserServiceStub, token: str = ADMIN_TOKEN) -> object:
    return stub.LookupUser(
        user_service_pb2.LookupUserRequest(email="ada@example.com"), metadata=bearer(token)
    )


async def refused_with(call: object) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    error = raised.value
    info = only_error_info(rich_status_from_metadata(error.trailing_metadata()))
    return f"{error.code().name} {info.reason}"


async def test_an_admin_tokens_check_rides_on_the_read_and_costs_no_read_of_its_own(
    served: Served,
) -> None:
    answer = await lookup(served.stub)  # type: ignore[misc]

    assert answer.user.email == "ada@example.com"
    [check] = served.users.role_checks
    assert check is not None
    assert check.passed is True
    assert served.auth.own_reads == 0


async def test_a_check_that_fails_in_the_read_refuses_the_call(served: Served) -> None:
    served.users.account_backs_token = False

    assert await refused_with(lookup(served.stub)) == "UNAUTHENTICATED TOKEN_REVOKED"
    assert served.auth.own_reads == 0


async def test_a_call_ended_before_its_read_is_checked_all_the_same_and_refused(
    served: Served,
) -> None:
    served.users.error = errors.InvalidArgument.single("email", "bad")
    served.auth.account_backs_token = False

    assert await refused_with(lookup(served.stub)) == "UNAUTHENTICATED TOKEN_REVOKED"
    assert served.auth.own_reads == 1


async def test_a_call_ended_before_its_read_keeps_its_answer_when_the_check_passes(
    served: Served,
) -> None:
    served.users.error = errors.InvalidArgument.single("email", "bad")

    assert await refused_with(lookup(served.stub)) == "INVALID_ARGUMENT INVALID_ARGUMENT"
    assert served.auth.own_reads == 1


async def test_a_list_whose_read_did_not_settle_the_check_is_checked_before_it_answers(
    served: Served,
) -> None:
    # A page with a filter is read in a unit of work, without the account:
    # the interceptor settles the check itself, and its failure is the answer.
    served.auth.account_backs_token = False

    refusal = await refused_with(
        served.stub.ListUsers(
            user_service_pb2.ListUsersRequest(filter='email:"@example.com"'),
            metadata=bearer(ADMIN_TOKEN),
        )
    )

    assert refusal == "UNAUTHENTICATED TOKEN_REVOKED"
    [check] = served.users.role_checks
    assert check is not None
    assert served.auth.own_reads == 1


async def test_other_methods_check_the_roles_before_the_handler_runs(served: Served) -> None:
    served.auth.account_backs_token = False

    refusal = await refused_with(
        served.stub.UndeleteUser(
            user_service_pb2.UndeleteUserRequest(id=CALLER_ID), metadata=bearer(ADMIN_TOKEN)
        )
    )

    assert refusal == "UNAUTHENTICATED TOKEN_REVOKED"
    assert served.users.calls == []
    assert served.auth.own_reads == 1


async def test_a_plain_users_token_hands_no_check_to_the_read(served: Served) -> None:
    await served.stub.GetUser(user_service_pb2.GetUserRequest(id="me"), metadata=bearer())

    assert served.users.role_checks == [None]
    assert served.auth.own_reads == 0


async def test_update_user_hands_the_check_to_its_write(served: Served) -> None:
    await served.stub.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=CALLER_ID, display_name="Ada"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        ),
        metadata=bearer(ADMIN_TOKEN),
    )

    [check] = served.users.role_checks
    assert check is not None
    assert check.principal == ADMIN
