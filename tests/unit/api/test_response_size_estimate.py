"""usersvc.services.response_size over-estimates what a user costs on the
wire: checked here against the real encoding (services cannot see it)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from usersvc_protos.v1 import user_service_pb2
from usersvc.api import mappers
from usersvc.domain.models import User
from usersvc.domain.wire_size import MAX_USER_WIRE_BYTES
from usersvc.services.response_size import (
    MAX_USERS_BYTES,
    byte_budget,
    fitting_prefix,
    user_wire_bytes,
)

from .support import make_user

FAR_FUTURE = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)


def heaviest(char: str) -> User:
    """64 labels of 63-character keys and 256 values of ``char``, a
    200-character name, 16 roles, every timestamp set and large."""
    return make_user(
        email=("a" * 64) + "@" + ("b" * 63 + ".") * 2 + "c" * 60,
        display_name=char * 200,
        roles=tuple(f"role-{index:02d}" for index in range(16)),
        labels={f"k{index:02d}".ljust(63, "x"): char * 256 for index in range(64)},
        create_time=FAR_FUTURE,
        update_time=FAR_FUTURE,
        disable_time=FAR_FUTURE,
        delete_time=FAR_FUTURE,
        version=2**62,
    )


@pytest.mark.parametrize(
    "user",
    [make_user(), make_user(labels={}, display_name="", roles=()), heaviest("a"), heaviest("😀")],
    ids=["plain", "empty", "ascii", "four-byte"],
)
def test_the_estimate_is_at_least_the_encoded_size_inside_a_response(user: User) -> None:
    one = user_service_pb2.BatchGetUsersResponse(users=[mappers.user_to_proto(user)])
    assert user_wire_bytes(user) >= one.ByteSize()


def test_as_many_heaviest_users_as_fit_stay_below_4_mib_encoded() -> None:
    users = [heaviest("😀")] * 1000
    count = fitting_prefix(users)
    response = user_service_pb2.ListUsersResponse(
        users=mappers.users_to_proto(users[:count]),
        next_page_token="x" * 1024,
        total_size=2**31 - 1,
    )
    assert 0 < count < 1000
    assert response.ByteSize() < 4 * 1024 * 1024
    assert user_wire_bytes(users[0]) * count <= MAX_USERS_BYTES


def test_one_user_always_fits() -> None:
    assert fitting_prefix([heaviest("a")], budget=1) == 1
    assert fitting_prefix([]) == 0


def test_the_heaviest_user_costs_no_more_than_the_most_any_valid_user_may() -> None:
    assert user_wire_bytes(heaviest("😀")) <= MAX_USER_WIRE_BYTES


def test_only_reads_that_could_pass_the_budget_sum_sizes() -> None:
    assert byte_budget(51) is None  # the default page and its one more
    assert byte_budget(1001) == MAX_USERS_BYTES
    for count in range(1, 1002):
        if byte_budget(count) is None:
            assert count * MAX_USER_WIRE_BYTES <= MAX_USERS_BYTES
