"""UserService ends sessions: disabling, deleting and purging a user end all
of them, a password change all but the caller's own on a self change. Every
revocation is logged, announced on commit only, and reaches this process's
cache after the commit."""

from __future__ import annotations

import uuid
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from fakes import (
    FakePasswordHasher,
    UserServiceHarness,
    as_admin,
    as_user,
    user_service,
)

from usersvc.domain.errors import InvalidCredentials, UserNotFound
from usersvc.domain.models import RevokeReason, Session, User, UserPatch
from usersvc.services.inputs import UpdateUserInput

OLD_PASSWORD = "the old passphrase"
NEW_PASSWORD = "a brand new passphrase"
FAR_FUTURE = datetime(2100, 1, 1, tzinfo=UTC)


def with_ann(**fields: object) -> tuple[UserServiceHarness, User]:
    h = user_service()
    ann = h.db.insert(
        "ann@example.com",
        password_hash=FakePasswordHasher.hash_at(OLD_PASSWORD, 4),
        **fields,  # type: ignore[arg-type]
    )
    return h, ann


async def open_session(h: UserServiceHarness, user: User) -> Session:
    async with h.db.uow() as uow:
        session = await uow.sessions.create(user.id, FAR_FUTURE)
        await uow.commit()
    return session


def reasons(h: UserServiceHarness) -> dict[uuid.UUID, RevokeReason | None]:
    return {s.id: s.revoke_reason for s in h.db.sessions.values()}


# -- disable -----------------------------------------------------------------------


async def test_disabling_a_user_ends_all_its_sessions() -> None:
    h, ann = with_ann()
    one, two = await open_session(h, ann), await open_session(h, ann)
    await h.service.disable_user(principal=as_admin(), user_id=str(ann.id))
    assert reasons(h) == {one.id: RevokeReason.DISABLED, two.id: RevokeReason.DISABLED}


async def test_disabling_announces_the_sessions_and_tells_this_process() -> None:
    h, ann = with_ann()
    one = await open_session(h, ann)
    await h.service.disable_user(principal=as_admin(), user_id=str(ann.id))
    assert h.db.notifications == [[one.id]]
    assert list(h.revocations.locally) == [str(one.id)]
    assert one.id in h.db.revocations


async def test_disabling_leaves_other_users_sessions_alone() -> None:
    h, ann = with_ann()
    bob = h.db.insert("bob@example.com")
    bobs = await open_session(h, bob)
    await h.service.disable_user(principal=as_admin(), user_id=str(ann.id))
    assert h.db.sessions[bobs.id].revoke_time is None


async def test_disabling_an_already_disabled_user_announces_nothing() -> None:
    h, ann = with_ann(disabled=True)
    await open_session(h, ann)
    await h.service.disable_user(principal=as_admin(), user_id=str(ann.id))
    assert h.db.notifications == []


async def test_enabling_a_user_ends_no_session() -> None:
    h, ann = with_ann(disabled=True)
    one = await open_session(h, ann)
    await h.service.enable_user(principal=as_admin(), user_id=str(ann.id))
    assert reasons(h) == {one.id: None}


# -- roles -------------------------------------------------------------------------


async def test_a_role_change_ends_all_the_users_sessions_and_tells_this_process() -> None:
    h, ann = with_ann()
    admin = h.db.insert("admin@example.com", roles=("user", "admin"))
    one, two = await open_session(h, ann), await open_session(h, ann)
    await h.service.update_user(
        principal=as_admin(admin),
        request=UpdateUserInput(user_id=str(ann.id), etag="", patch=UserPatch(roles=("admin",))),
    )
    assert reasons(h) == {one.id: RevokeReason.ROLES_CHANGED, two.id: RevokeReason.ROLES_CHANGED}
    assert sorted(h.revocations.locally) == sorted([str(one.id), str(two.id)])


async def test_a_self_demotion_ends_the_callers_own_session_too() -> None:
    h, ann = with_ann(roles=("user", "admin"))
    own = await open_session(h, ann)
    caller = replace(as_user(ann), session_id=str(own.id))
    await h.service.update_user(
        principal=caller,
        request=UpdateUserInput(user_id="me", etag="", patch=UserPatch(roles=("user",))),
    )
    assert reasons(h) == {own.id: RevokeReason.ROLES_CHANGED}


async def test_setting_the_same_roles_or_other_fields_ends_no_session() -> None:
    h, ann = with_ann()
    admin = h.db.insert("admin@example.com", roles=("user", "admin"))
    one = await open_session(h, ann)
    for patch in (UserPatch(roles=("user",)), UserPatch(display_name="Ann")):
        await h.service.update_user(
            principal=as_admin(admin),
            request=UpdateUserInput(user_id=str(ann.id), etag="", patch=patch),
        )
    assert reasons(h) == {one.id: None}


# -- delete and purge --------------------------------------------------------------


async def test_deleting_a_user_ends_all_its_sessions() -> None:
    h, ann = with_ann()
    one = await open_session(h, ann)
    await h.service.delete_user(principal=as_admin(), user_id=str(ann.id), etag="")
    assert reasons(h) == {one.id: RevokeReason.DELETED}


async def test_a_self_delete_ends_the_callers_own_session_too() -> None:
    h, ann = with_ann()
    own = await open_session(h, ann)
    caller = replace(as_user(ann), session_id=str(own.id))
    await h.service.delete_user(principal=caller, user_id="me", etag="")
    assert reasons(h) == {own.id: RevokeReason.DELETED}


async def test_purging_a_user_deletes_its_sessions_but_keeps_them_revoked() -> None:
    h, ann = with_ann()
    one = await open_session(h, ann)
    await h.service.purge_user(principal=as_admin(), user_id=str(ann.id))
    assert h.db.sessions == {}
    assert one.id in h.db.revocations
    assert h.db.notifications == [[one.id]]


async def test_purging_a_missing_user_announces_nothing() -> None:
    h, ann = with_ann()
    await open_session(h, ann)
    with pytest.raises(UserNotFound):
        await h.service.purge_user(principal=as_admin(), user_id=str(uuid.uuid4()))
    assert (h.db.notifications, h.revocations.locally) == ([], {})


# -- change password ---------------------------------------------------------------


async def test_a_self_change_keeps_the_callers_session_and_ends_the_others() -> None:
    h, ann = with_ann()
    own, other = await open_session(h, ann), await open_session(h, ann)
    caller = replace(as_user(ann), session_id=str(own.id))
    await h.service.change_password(
        principal=caller,
        user_id="me",
        current_password=OLD_PASSWORD,
        new_password=NEW_PASSWORD,
    )
    assert reasons(h) == {own.id: None, other.id: RevokeReason.PASSWORD_CHANGED}


async def test_an_admin_change_of_another_users_password_ends_all_its_sessions() -> None:
    h, ann = with_ann()
    one, two = await open_session(h, ann), await open_session(h, ann)
    await h.service.change_password(
        principal=as_admin(), user_id=str(ann.id), current_password="", new_password=NEW_PASSWORD
    )
    assert reasons(h) == {
        one.id: RevokeReason.PASSWORD_CHANGED,
        two.id: RevokeReason.PASSWORD_CHANGED,
    }


async def test_an_admin_changing_its_own_password_keeps_its_session() -> None:
    h, admin_user = with_ann(roles=("user", "admin"))
    own, other = await open_session(h, admin_user), await open_session(h, admin_user)
    caller = replace(as_admin(admin_user), session_id=str(own.id))
    await h.service.change_password(
        principal=caller,
        user_id="me",
        current_password=OLD_PASSWORD,
        new_password=NEW_PASSWORD,
    )
    assert reasons(h) == {own.id: None, other.id: RevokeReason.PASSWORD_CHANGED}


async def test_a_refused_password_change_ends_no_session() -> None:
    h, ann = with_ann()
    one = await open_session(h, ann)
    with pytest.raises(InvalidCredentials):
        await h.service.change_password(
            principal=as_user(ann),
            user_id="me",
            current_password="not the password",
            new_password=NEW_PASSWORD,
        )
    assert (reasons(h), h.db.notifications) == ({one.id: None}, [])
