"""The re-check of a privileged token's roles against the stored account
(usersvc.domain.role_checks): when it passes, when it refuses, and that it
is done once."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from usersvc.domain.errors import TokenRevoked
from usersvc.domain.models import Principal, PrincipalKind, User
from usersvc.domain.role_checks import RoleCheck

ACCOUNT = uuid.UUID("0190b4a4-7d40-7c3e-9a51-6a1b2c3d4e5f")
MOMENT = datetime(2024, 5, 6, tzinfo=UTC)


def admin_token() -> Principal:
    return Principal(
        kind=PrincipalKind.USER, subject=str(ACCOUNT), roles=frozenset({"user", "admin"})
    )


def stored(**overrides: object) -> User:
    user = User(
        id=ACCOUNT,
        email="ada@example.com",
        display_name="Ada",
        roles=("user", "admin"),
        labels={},
        create_time=MOMENT,
        update_time=MOMENT,
        disable_time=None,
        delete_time=None,
        version=1,
    )
    return replace(user, **overrides)  # type: ignore[arg-type]


def test_a_check_is_pending_until_settled_and_names_the_tokens_account() -> None:
    check = RoleCheck.of(admin_token())

    assert check.account_id == ACCOUNT
    assert not check.done
    check.ensure_passed()  # nothing to refuse yet


def test_an_active_account_holding_every_claimed_role_passes() -> None:
    check = RoleCheck.of(admin_token())

    check.settle_on(stored(roles=("admin", "user", "service")))

    assert check.passed is True


@pytest.mark.parametrize(
    "account",
    [
        None,
        stored(roles=("user",)),
        stored(disable_time=MOMENT),
        stored(delete_time=MOMENT),
    ],
    ids=["missing", "demoted", "disabled", "deleted"],
)
def test_an_account_that_no_longer_backs_the_token_refuses_it(account: User | None) -> None:
    check = RoleCheck.of(admin_token())

    with pytest.raises(TokenRevoked):
        check.settle_on(account)

    assert check.passed is False
    with pytest.raises(TokenRevoked):
        check.ensure_passed()


def test_only_a_users_token_has_an_account_to_check() -> None:
    service = Principal(
        kind=PrincipalKind.SERVICE, subject="spiffe://x", roles=frozenset({"service"})
    )

    with pytest.raises(ValueError, match="account"):
        RoleCheck.of(service)


def test_a_principal_knows_its_user_id_and_a_replaced_subject_gets_its_own() -> None:
    principal = admin_token()
    other = uuid.uuid4()

    assert principal.user_id() == ACCOUNT
    assert replace(principal, subject=str(other)).user_id() == other
    assert replace(principal, subject="not-a-uuid").user_id() is None
    assert replace(principal, kind=PrincipalKind.SERVICE).user_id() is None
    # The parsed id takes no part in equality.
    assert replace(principal) == principal
