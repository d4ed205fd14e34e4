"""Who may call what (usersvc.domain.policies): the table in docs/api.md."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from fakes import as_admin, as_mtls_service, as_service_account, as_user

from usersvc.domain import policies
from usersvc.domain.errors import PermissionDenied
from usersvc.domain.models import ANONYMOUS, Principal, PrincipalKind

SELF = uuid.UUID("0190a4b2-6c1e-7cc3-8a1b-000000000001")
OTHER = uuid.UUID("0190a4b2-6c1e-7cc3-8a1b-000000000002")

CALLERS: dict[str, Principal] = {
    "anonymous": ANONYMOUS,
    "user": as_user(SELF),
    "admin": as_admin(SELF),
    "service account": as_service_account(SELF),
    "mtls service": as_mtls_service(),
}


# (rule applied to a caller, callers allowed) for rules about another user.
ON_OTHERS: dict[str, tuple[Callable[[Principal], bool], set[str]]] = {
    "read": (lambda p: policies.can_read(p, OTHER), {"admin", "service account", "mtls service"}),
    "lookup": (policies.can_lookup, {"admin", "service account", "mtls service"}),
    "list": (policies.can_list, {"admin", "service account", "mtls service"}),
    "batch get": (policies.can_batch_get, {"admin", "service account", "mtls service"}),
    "batch create": (policies.can_batch_create, {"admin", "service account", "mtls service"}),
    "see deleted": (policies.can_see_deleted, {"admin"}),
    "update": (lambda p: policies.can_update(p, OTHER, ["display_name"]), {"admin"}),
    "delete": (lambda p: policies.can_delete(p, OTHER), {"admin"}),
    "undelete": (policies.can_undelete, {"admin"}),
    "purge": (policies.can_purge, {"admin"}),
    "disable/enable": (policies.can_change_state, {"admin"}),
    "change password": (lambda p: policies.can_change_password(p, OTHER), {"admin"}),
}

# Rules about the caller's own account.
ON_SELF: dict[str, tuple[Callable[[Principal], bool], set[str]]] = {
    "read": (
        lambda p: policies.can_read(p, SELF),
        {"user", "admin", "service account", "mtls service"},
    ),
    "update profile": (
        lambda p: policies.can_update(p, SELF, ["email", "display_name", "labels"]),
        {"user", "admin", "service account"},
    ),
    "update own roles": (lambda p: policies.can_update(p, SELF, ["roles"]), {"admin"}),
    "delete": (lambda p: policies.can_delete(p, SELF), {"user", "admin", "service account"}),
    "change password": (
        lambda p: policies.can_change_password(p, SELF),
        {"user", "admin", "service account"},
    ),
}


@pytest.mark.parametrize("rule", list(ON_OTHERS))
@pytest.mark.parametrize("caller", list(CALLERS))
def test_rules_about_other_users_follow_the_table(rule: str, caller: str) -> None:
    check, allowed_callers = ON_OTHERS[rule]
    assert check(CALLERS[caller]) is (caller in allowed_callers)


@pytest.mark.parametrize("rule", list(ON_SELF))
@pytest.mark.parametrize("caller", list(CALLERS))
def test_rules_about_the_callers_own_account_follow_the_table(rule: str, caller: str) -> None:
    check, allowed_callers = ON_SELF[rule]
    assert check(CALLERS[caller]) is (caller in allowed_callers)


# -- create ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caller", "roles", "signup", "allowed"),
    [
        ("anonymous", [], True, True),
        ("anonymous", ["user"], True, True),
        ("anonymous", ["user", "user"], True, True),
        ("anonymous", [], False, False),
        ("anonymous", ["admin"], True, False),
        ("anonymous", ["service"], True, False),
        ("anonymous", ["bogus"], True, False),
        ("user", [], True, True),
        ("user", [], False, False),
        ("user", ["admin"], True, False),
        ("service account", [], False, True),
        ("service account", ["user"], False, True),
        ("service account", ["admin"], True, False),
        ("service account", ["service"], True, False),
        ("mtls service", [], False, True),
        ("mtls service", ["admin"], False, False),
        ("admin", [], False, True),
        ("admin", ["admin", "service"], False, True),
        ("admin", ["bogus"], False, True),  # validation, not policy, refuses it
    ],
)
def test_who_may_create_users_with_which_roles(
    caller: str, roles: list[str], signup: bool, allowed: bool
) -> None:
    assert policies.can_create(CALLERS[caller], roles, allow_signup=signup) is allowed


# -- details ---------------------------------------------------------------------------


def test_an_anonymous_principal_carrying_admin_roles_is_still_anonymous() -> None:
    forged = Principal(kind=PrincipalKind.ANONYMOUS, roles=frozenset({"admin", "service"}))
    assert not policies.can_purge(forged)
    assert not policies.can_list(forged)
    assert not policies.can_create(forged, ["admin"], allow_signup=True)


def test_a_user_whose_subject_is_not_a_uuid_is_nobody_in_particular() -> None:
    odd = Principal(kind=PrincipalKind.USER, subject="not-a-uuid", roles=frozenset({"user"}))
    assert not policies.can_read(odd, SELF)


@pytest.mark.parametrize(
    ("caller", "target", "required"),
    [
        (as_user(SELF), SELF, True),
        (as_admin(SELF), SELF, True),
        (as_admin(SELF), OTHER, False),
        (as_service_account(SELF), SELF, True),
    ],
)
def test_who_must_give_the_current_password(
    caller: Principal, target: uuid.UUID, required: bool
) -> None:
    assert policies.requires_current_password(caller, target) is required


def test_ensure_raises_permission_denied_naming_the_action() -> None:
    with pytest.raises(PermissionDenied, match="purge users"):
        policies.ensure(False, "purge users")


def test_ensure_passes_when_allowed() -> None:
    policies.ensure(True, "anything")
