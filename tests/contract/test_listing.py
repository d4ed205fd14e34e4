"""ListUsers' page_size rules (AIP-158) and opaque page tokens, as an admin
(skipped without USERSVC_CONTRACT_ADMIN_EMAIL / _PASSWORD)."""

from __future__ import annotations

import grpc
import pytest

from .client import USER_SERVICE, CallFailed, ReflectedApi
from .conftest import Account, sign_up

LIST = f"{USER_SERVICE}.ListUsers"


@pytest.fixture(scope="module")
def two_more_users(api: ReflectedApi, request: pytest.FixtureRequest) -> list[Account]:
    """At least three users exist (the admin and these two), so pages of one
    have a next page."""
    return [sign_up(api, request), sign_up(api, request)]


def test_a_negative_page_size_is_invalid_argument_naming_page_size(
    api: ReflectedApi, admin_token: str
) -> None:
    with pytest.raises(CallFailed) as raised:
        api.call(LIST, token=admin_token, page_size=-1)

    assert raised.value.failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.failure.reason == "INVALID_ARGUMENT"
    assert "page_size" in raised.value.failure.violated_fields()


def test_page_size_zero_means_at_most_fifty(
    api: ReflectedApi, admin_token: str, two_more_users: list[Account]
) -> None:
    reply = api.call(LIST, token=admin_token, page_size=0)

    assert 3 <= len(reply.message.users) <= 50
    assert reply.message.total_size >= len(reply.message.users)


def test_a_page_size_above_the_maximum_is_lowered_not_refused(
    api: ReflectedApi, admin_token: str, two_more_users: list[Account]
) -> None:
    reply = api.call(LIST, token=admin_token, page_size=5000)

    assert 3 <= len(reply.message.users) <= 1000


def test_pages_of_one_follow_each_other_without_repeating(
    api: ReflectedApi, admin_token: str, two_more_users: list[Account]
) -> None:
    first = api.call(LIST, token=admin_token, page_size=1).message
    second = api.call(LIST, token=admin_token, page_size=1, page_token=first.next_page_token)

    assert len(first.users) == 1
    assert first.next_page_token
    assert first.total_size >= 3
    assert len(second.message.users) == 1
    assert second.message.users[0].id != first.users[0].id


def test_a_page_token_reused_with_another_order_is_invalid_argument(
    api: ReflectedApi, admin_token: str, two_more_users: list[Account]
) -> None:
    first = api.call(LIST, token=admin_token, page_size=1).message

    with pytest.raises(CallFailed) as raised:
        api.call(
            LIST,
            token=admin_token,
            page_size=1,
            page_token=first.next_page_token,
            order_by="email desc",
        )

    assert raised.value.failure.code == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.failure.reason == "INVALID_ARGUMENT"
