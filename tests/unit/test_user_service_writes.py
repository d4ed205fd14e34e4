"""UserService writes: update, delete, undelete, purge, disable/enable, passwords."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from fakes import (
    FakeDatabase,
    FakePasswordHasher,
    UserServiceHarness,
    as_admin,
    as_service_account,
    as_user,
    user_service,
)

from usersvc.domain.errors import (
    EmailAlreadyExists,
    EtagMismatch,
    InvalidArgument,
    InvalidCredentials,
    InvalidState,
    PermissionDenied,
    TokenRevoked,
    UserNotFound,
    WeakPassword,
)
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.models import (
    NO_VERSION,
    NewUser,
    Principal,
    User,
    UserPatch,
    UserState,
    etag_for,
    version_in_etag,
)
from usersvc.domain.ports import UpdateOutcome, UserUpdate
from usersvc.domain.role_checks import RoleCheck
from usersvc.services.inputs import CreateUserInput, UpdateUserInput
from usersvc.services.users import UnitOfWorkUserWriter

MISSING = "0190a4b2-6c1e-7cc3-8a1b-00000000dead"
OLD_PASSWORD = "the old passphrase"
NEW_PASSWORD = "a brand new passphrase"


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


def with_ann(**fields: object) -> tuple[UserServiceHarness, User]:
    h = user_service()
    ann = h.db.insert(
        "ann@example.com",
        password_hash=FakePasswordHasher.hash_at(OLD_PASSWORD, 4),
        **fields,  # type: ignore[arg-type]
    )
    return h, ann


async def update(
    h: UserServiceHarness, principal: Principal, user_id: str, etag: str = "", **patch: object
) -> User:
    return await h.service.update_user(
        principal=principal,
        request=UpdateUserInput(user_id=user_id, etag=etag, patch=UserPatch(**patch)),  # type: ignore[arg-type]
    )


# -- update_user ---------------------------------------------------------------------------


async def test_a_user_updates_its_own_profile() -> None:
    h, ann = with_ann()
    updated = await update(h, as_user(ann), "me", display_name=" Ann Lee ", labels={"a": "b"})
    assert (updated.display_name, updated.labels) == ("Ann Lee", {"a": "b"})
    assert h.db.user(ann.id) == updated


async def test_an_update_changes_the_etag() -> None:
    h, ann = with_ann()
    updated = await update(h, as_user(ann), "me", display_name="Ann")
    assert updated.etag != ann.etag


async def test_only_the_fields_in_the_patch_change() -> None:
    h, ann = with_ann(display_name="Ann", labels={"team": "x"})
    updated = await update(h, as_user(ann), "me", email="Ann.Lee@Example.com")
    assert (updated.email, updated.display_name, updated.labels) == (
        "ann.lee@example.com",
        "Ann",
        {"team": "x"},
    )


async def test_labels_are_replaced_as_a_whole() -> None:
    h, ann = with_ann(labels={"team": "x", "tier": "gold"})
    updated = await update(h, as_user(ann), "me", labels={"team": "y"})
    assert updated.labels == {"team": "y"}


async def test_a_user_may_not_change_its_own_roles() -> None:
    h, ann = with_ann()
    with pytest.raises(PermissionDenied):
        await update(h, as_user(ann), "me", roles=("admin",))
    assert h.db.user(ann.id) == ann


async def test_admins_change_roles_and_user_is_always_kept() -> None:
    h, ann = with_ann()
    admin = h.db.insert("admin@example.com", roles=("user", "admin"))
    updated = await update(h, as_admin(admin), str(ann.id), roles=("admin",))
    assert updated.roles == ("admin", "user")


async def test_a_role_change_by_a_caller_no_longer_stored_as_admin_is_denied() -> None:
    # The token still says admin; the stored row no longer does.
    h, ann = with_ann()
    demoted = h.db.insert("demoted@example.com", roles=("user",))
    with pytest.raises(PermissionDenied):
        await update(h, as_admin(demoted), str(ann.id), roles=("admin",))
    assert h.db.user(ann.id) == ann


async def test_a_demoted_admin_may_not_give_itself_admin_again() -> None:
    h, ann = with_ann()
    with pytest.raises(PermissionDenied):
        await update(h, as_admin(ann), "me", roles=("user", "admin"))
    assert h.db.user(ann.id) == ann


async def test_other_admin_only_fields_need_no_stored_role_check() -> None:
    # A certificate-authenticated service has no row; only roles are checked.
    h, ann = with_ann()
    updated = await update(h, as_admin(), str(ann.id), display_name="Ann")
    assert updated.display_name == "Ann"


async def test_a_user_may_not_update_another_user() -> None:
    h, ann = with_ann()
    bob = h.db.insert("bob@example.com")
    with pytest.raises(PermissionDenied):
        await update(h, as_user(ann), str(bob.id), display_name="Bob")


async def test_a_user_is_denied_updating_a_missing_user_not_told_it_is_missing() -> None:
    h, ann = with_ann()
    with pytest.raises(PermissionDenied):
        await update(h, as_user(ann), MISSING, display_name="x")


async def test_services_may_not_update_users() -> None:
    h, ann = with_ann()
    with pytest.raises(PermissionDenied):
        await update(h, as_service_account(), str(ann.id), display_name="x")


async def test_an_empty_patch_is_an_invalid_update_mask() -> None:
    h, ann = with_ann()
    with pytest.raises(InvalidArgument) as caught:
        await update(h, as_user(ann), "me")
    assert fields_of(caught.value) == ["update_mask"]


async def test_bad_values_are_reported_under_user() -> None:
    h, ann = with_ann()
    with pytest.raises(InvalidArgument) as caught:
        await update(h, as_admin(), str(ann.id), email="nope", roles=("root",), labels={"X": ""})
    assert fields_of(caught.value) == ["user.email", "user.roles[0]", "user.labels"]


async def test_a_malformed_user_id_is_reported_under_user_id() -> None:
    h, _ = with_ann()
    with pytest.raises(InvalidArgument) as caught:
        await update(h, as_admin(), "nope", display_name="x")
    assert fields_of(caught.value) == ["user.id"]


async def test_changing_to_a_taken_email_is_refused() -> None:
    h, ann = with_ann()
    h.db.insert("bob@example.com")
    with pytest.raises(EmailAlreadyExists):
        await update(h, as_user(ann), "me", email="BOB@example.com")
    assert h.db.user(ann.id) == ann


async def test_a_stale_etag_is_refused_and_changes_nothing() -> None:
    h, ann = with_ann()
    await update(h, as_user(ann), "me", display_name="First")
    current = h.db.user(ann.id)
    with pytest.raises(EtagMismatch):
        await update(h, as_user(ann), "me", etag=ann.etag, display_name="Second")
    assert h.db.user(ann.id) == current


async def test_the_current_etag_is_accepted() -> None:
    h, ann = with_ann()
    updated = await update(h, as_user(ann), "me", etag=ann.etag, display_name="Ann")
    assert updated.display_name == "Ann"


async def test_an_etag_the_service_never_made_is_stale_not_an_error() -> None:
    h, ann = with_ann()
    with pytest.raises(EtagMismatch):
        await update(h, as_user(ann), "me", etag="W/not-ours", display_name="Second")
    assert h.db.user(ann.id) == ann


async def test_an_etag_for_a_missing_user_is_user_not_found() -> None:
    h = user_service()
    with pytest.raises(UserNotFound):
        await update(h, as_admin(), MISSING, etag="v1", display_name="x")


async def test_admins_updating_a_deleted_user_with_its_etag_get_invalid_state() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(InvalidState):
        await update(h, as_admin(), str(ann.id), etag=ann.etag, display_name="x")


async def test_admins_updating_a_deleted_user_get_invalid_state() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(InvalidState) as caught:
        await update(h, as_admin(), str(ann.id), display_name="x")
    assert caught.value.already_exists is False


async def test_a_deleted_user_updating_itself_is_not_found() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(UserNotFound):
        await update(h, as_user(ann), "me", display_name="x")


async def test_updating_a_missing_user_is_not_found() -> None:
    h, _ = with_ann()
    with pytest.raises(UserNotFound):
        await update(h, as_admin(), MISSING, display_name="x")


class RecordingWriter:
    """A UserWriter that records what reaches it and runs it through the
    fakes' unit of work, as the write lane would in one statement."""

    def __init__(self, db: FakeDatabase) -> None:
        self.changes: list[UserUpdate] = []
        self.creates: list[NewUser] = []
        self._inner = UnitOfWorkUserWriter(db.uow)

    async def update(
        self, change: UserUpdate, *, events: Sequence[EventDraft] = ()
    ) -> UpdateOutcome:
        self.changes.append(change)
        return await self._inner.update(change, events=events)

    async def create(
        self,
        new: NewUser,
        *,
        events: Sequence[EventDraft] = (),
        role_check: RoleCheck | None = None,
    ) -> User:
        self.creates.append(new)
        return await self._inner.create(new, events=events, role_check=role_check)


def with_writer() -> tuple[UserServiceHarness, RecordingWriter, User]:
    writers: list[RecordingWriter] = []

    def make(db: FakeDatabase) -> RecordingWriter:
        writers.append(RecordingWriter(db))
        return writers[0]

    h = user_service(writer=make)
    ann = h.db.insert("ann@example.com")
    return h, writers[0], ann


async def test_names_and_labels_go_to_the_one_statement_writer_with_the_etags_version() -> None:
    h, writer, ann = with_writer()
    updated = await update(h, as_user(ann), "me", etag=ann.etag, display_name="Ann", labels={})
    assert [(c.user_id, c.expected_version, c.admin_caller) for c in writer.changes] == [
        (ann.id, ann.version, None)
    ]
    assert h.db.user(ann.id) == updated


async def test_a_create_without_a_request_id_goes_to_the_one_statement_writer() -> None:
    h, writer, _ = with_writer()
    request = CreateUserInput(email="Bob@Example.com", password="correct horse battery")
    bob = await h.service.create_user(principal=as_admin(), request=request)
    assert [(n.email, n.roles) for n in writer.creates] == [("bob@example.com", ("user",))]
    assert h.db.user(bob.id) == bob
    assert [e.type for e in h.db.events if e.user_id == bob.id] == [EventType.USER_CREATED.value]


async def test_a_create_with_a_request_id_stores_its_key_in_a_unit_of_work_not_the_writer() -> None:
    h, writer, _ = with_writer()
    request = CreateUserInput(
        email="bob@example.com", password="correct horse battery", request_id="req-bob-1"
    )
    admin = as_admin()
    bob = await h.service.create_user(principal=admin, request=request)
    again = await h.service.create_user(principal=admin, request=request)
    assert writer.creates == []
    assert again == bob


@pytest.mark.parametrize("patch", [{"email": "ann2@example.com"}, {"roles": ("user",)}])
async def test_email_and_role_changes_take_a_unit_of_work_not_the_writer(
    patch: dict[str, object],
) -> None:
    h, writer, ann = with_writer()
    admin = h.db.insert("admin@example.com", roles=("user", "admin"))
    await update(h, as_admin(admin), str(ann.id), **patch)
    assert writer.changes == []
    assert h.db.user(ann.id) != ann


async def test_a_role_change_carries_the_caller_for_the_stored_admin_rule() -> None:
    h, ann = with_ann()
    admin = h.db.insert("admin@example.com", roles=("user", "admin"))
    updated = await update(h, as_admin(admin), str(ann.id), roles=("user", "admin"))
    assert updated.roles == ("admin", "user")
    [event] = [e for e in h.db.events if e.type == EventType.USER_UPDATED.value]
    assert event.changed_fields == ("roles",)


async def test_the_event_names_only_the_fields_whose_value_changed() -> None:
    h, ann = with_ann(display_name="Ann", labels={"a": "b"})
    await update(h, as_user(ann), "me", display_name="Ann", labels={"a": "c"})
    [event] = [e for e in h.db.events if e.type == EventType.USER_UPDATED.value]
    assert event.changed_fields == ("labels",)


@pytest.mark.parametrize(
    ("etag", "version"),
    [
        ("v7", 7),
        ("v1", 1),
        ("v07", NO_VERSION),
        ("7", NO_VERSION),
        ("v", NO_VERSION),
        ("W/v7", NO_VERSION),
        ("v\u0667", NO_VERSION),
        ("v" + "9" * 19, NO_VERSION),
    ],
)
def test_an_etag_names_a_version_only_when_etag_for_would_make_it(etag: str, version: int) -> None:
    assert version_in_etag(etag) == version
    if version != NO_VERSION:
        assert etag_for(version) == etag


# -- delete_user -------------------------------------------------------------------------


async def test_a_user_deletes_itself_softly() -> None:
    h, ann = with_ann()
    deleted = await h.service.delete_user(principal=as_user(ann), user_id="me", etag="")
    assert deleted.state is UserState.DELETED
    assert deleted.delete_time is not None
    assert h.db.user(ann.id) == deleted


async def test_admins_delete_other_users() -> None:
    h, ann = with_ann()
    deleted = await h.service.delete_user(principal=as_admin(), user_id=str(ann.id), etag="")
    assert deleted.state is UserState.DELETED


@pytest.mark.parametrize("who", ["user", "service"])
async def test_others_may_not_delete_a_user(who: str) -> None:
    h, ann = with_ann()
    bob = h.db.insert("bob@example.com")
    principal = as_user(bob) if who == "user" else as_service_account()
    with pytest.raises(PermissionDenied):
        await h.service.delete_user(principal=principal, user_id=str(ann.id), etag="")


async def test_a_stale_etag_refuses_the_delete() -> None:
    h, ann = with_ann()
    await update(h, as_user(ann), "me", display_name="Changed")
    with pytest.raises(EtagMismatch):
        await h.service.delete_user(principal=as_user(ann), user_id="me", etag=ann.etag)
    assert h.db.user(ann.id).state is UserState.ACTIVE  # type: ignore[union-attr]


async def test_deleting_an_already_deleted_user_is_invalid_state_for_admins() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(InvalidState):
        await h.service.delete_user(principal=as_admin(), user_id=str(ann.id), etag="")


async def test_deleting_oneself_twice_is_not_found() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(UserNotFound):
        await h.service.delete_user(principal=as_user(ann), user_id="me", etag="")


async def test_deleting_a_missing_user_is_not_found() -> None:
    h, _ = with_ann()
    with pytest.raises(UserNotFound):
        await h.service.delete_user(principal=as_admin(), user_id=MISSING, etag="")


# -- undelete / purge --------------------------------------------------------------------


async def test_admins_undelete_a_user_to_its_previous_state() -> None:
    h, ann = with_ann()
    admin = as_admin()
    await h.service.disable_user(principal=admin, user_id=str(ann.id))
    await h.service.delete_user(principal=admin, user_id=str(ann.id), etag="")
    restored = await h.service.undelete_user(principal=admin, user_id=str(ann.id))
    assert restored.state is UserState.DISABLED


async def test_undeleting_a_live_user_is_invalid_state_already_exists() -> None:
    h, ann = with_ann()
    with pytest.raises(InvalidState) as caught:
        await h.service.undelete_user(principal=as_admin(), user_id=str(ann.id))
    assert caught.value.already_exists is True


async def test_undeleting_a_missing_user_is_not_found() -> None:
    h, _ = with_ann()
    with pytest.raises(UserNotFound):
        await h.service.undelete_user(principal=as_admin(), user_id=MISSING)


async def test_non_admins_are_refused_before_the_id_is_looked_at() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(PermissionDenied):
        await h.service.undelete_user(principal=as_user(ann), user_id="not-an-id")


async def test_admins_purge_a_user_for_good_and_free_its_email() -> None:
    h, ann = with_ann(deleted=True)
    await h.service.purge_user(principal=as_admin(), user_id=str(ann.id))
    assert h.db.user(ann.id) is None
    assert h.db.insert("ann@example.com").email == "ann@example.com"


async def test_purging_a_missing_user_is_not_found() -> None:
    h, _ = with_ann()
    with pytest.raises(UserNotFound):
        await h.service.purge_user(principal=as_admin(), user_id=MISSING)


async def test_users_may_not_purge_even_themselves() -> None:
    h, ann = with_ann()
    with pytest.raises(PermissionDenied):
        await h.service.purge_user(principal=as_user(ann), user_id="me")
    assert h.db.user(ann.id) == ann


# -- disable / enable ----------------------------------------------------------------------


async def test_admins_disable_and_enable_users() -> None:
    h, ann = with_ann()
    admin = as_admin()
    disabled = await h.service.disable_user(principal=admin, user_id=str(ann.id))
    enabled = await h.service.enable_user(principal=admin, user_id=str(ann.id))
    assert (disabled.state, enabled.state) == (UserState.DISABLED, UserState.ACTIVE)


async def test_disabling_a_disabled_user_writes_nothing() -> None:
    h, ann = with_ann(disabled=True)
    again = await h.service.disable_user(principal=as_admin(), user_id=str(ann.id))
    assert again == ann
    assert h.db.commits == 0


async def test_enabling_an_active_user_writes_nothing() -> None:
    h, ann = with_ann()
    again = await h.service.enable_user(principal=as_admin(), user_id=str(ann.id))
    assert again == ann
    assert h.db.commits == 0


@pytest.mark.parametrize("action", ["disable_user", "enable_user"])
async def test_disable_and_enable_of_a_deleted_user_are_invalid_state(action: str) -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(InvalidState) as caught:
        await getattr(h.service, action)(principal=as_admin(), user_id=str(ann.id))
    assert caught.value.already_exists is False


@pytest.mark.parametrize("action", ["disable_user", "enable_user"])
async def test_disable_and_enable_of_a_missing_user_are_not_found(action: str) -> None:
    h, _ = with_ann()
    with pytest.raises(UserNotFound):
        await getattr(h.service, action)(principal=as_admin(), user_id=MISSING)


@pytest.mark.parametrize("action", ["disable_user", "enable_user"])
async def test_services_may_not_disable_or_enable(action: str) -> None:
    h, ann = with_ann()
    with pytest.raises(PermissionDenied):
        await getattr(h.service, action)(principal=as_service_account(), user_id=str(ann.id))


# -- change_password ---------------------------------------------------------------------


async def change(
    h: UserServiceHarness,
    principal: Principal,
    user_id: str = "me",
    current: str = OLD_PASSWORD,
    new: str = NEW_PASSWORD,
) -> None:
    await h.service.change_password(
        principal=principal, user_id=user_id, current_password=current, new_password=new
    )


async def test_a_user_changes_its_password_with_the_current_one() -> None:
    h, ann = with_ann()
    await change(h, as_user(ann))
    assert h.db.password_hash(ann.id) == FakePasswordHasher.hash_at(NEW_PASSWORD, 4)


async def test_a_wrong_current_password_is_invalid_credentials() -> None:
    h, ann = with_ann()
    with pytest.raises(InvalidCredentials):
        await change(h, as_user(ann), current="not the old one")
    assert h.db.password_hash(ann.id) == FakePasswordHasher.hash_at(OLD_PASSWORD, 4)


async def test_a_missing_current_password_is_an_invalid_argument() -> None:
    h, ann = with_ann()
    with pytest.raises(InvalidArgument) as caught:
        await change(h, as_user(ann), current="")
    assert fields_of(caught.value) == ["current_password"]


async def test_admins_need_their_own_current_password_too() -> None:
    h, ann = with_ann(roles=("user", "admin"))
    with pytest.raises(InvalidArgument):
        await change(h, as_user(ann), current="")


async def test_admins_set_other_users_passwords_without_the_current_one() -> None:
    h, ann = with_ann()
    await change(h, as_admin(), str(ann.id), current="")
    assert h.db.password_hash(ann.id) == FakePasswordHasher.hash_at(NEW_PASSWORD, 4)


async def test_a_user_may_not_change_another_users_password() -> None:
    h, ann = with_ann()
    bob = h.db.insert("bob@example.com")
    with pytest.raises(PermissionDenied):
        await change(h, as_user(bob), str(ann.id))


async def test_a_weak_new_password_is_refused_under_new_password() -> None:
    h, ann = with_ann()
    with pytest.raises(WeakPassword) as caught:
        await change(h, as_user(ann), new="password1")
    assert fields_of(caught.value) == ["new_password"]
    assert h.db.password_hash(ann.id) == FakePasswordHasher.hash_at(OLD_PASSWORD, 4)


async def test_the_new_password_may_not_be_the_email() -> None:
    h, ann = with_ann()
    with pytest.raises(WeakPassword):
        await change(h, as_user(ann), new="ANN@example.com")


async def test_changing_the_password_of_a_missing_user_is_not_found() -> None:
    h, _ = with_ann()
    with pytest.raises(UserNotFound):
        await change(h, as_admin(), MISSING, current="")


async def test_a_deleted_user_changing_its_password_is_not_found() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(UserNotFound):
        await change(h, as_user(ann))


async def test_admins_changing_a_deleted_users_password_get_invalid_state() -> None:
    h, ann = with_ann(deleted=True)
    with pytest.raises(InvalidState):
        await change(h, as_admin(), str(ann.id), current="")


async def test_the_new_password_is_hashed_while_no_unit_of_work_is_open() -> None:
    h, ann = with_ann()
    await change(h, as_user(ann))
    assert h.hasher.units_open_while_hashing == [0]


async def test_a_password_changed_meanwhile_voids_the_current_password_check() -> None:
    h, ann = with_ann()

    def concurrent_change() -> None:
        row = h.db.rows[ann.id]
        h.db.rows[ann.id] = type(row)(row.user, FakePasswordHasher.hash_at("changed", 4))

    h.hasher.on_hash = concurrent_change
    with pytest.raises(InvalidCredentials):
        await change(h, as_user(ann))
    assert h.db.password_hash(ann.id) == FakePasswordHasher.hash_at("changed", 4)


@pytest.mark.parametrize("patch", [{"display_name": "Ann"}, {"roles": ("user", "admin")}])
async def test_an_admins_pending_role_check_is_settled_by_the_write_itself(
    patch: dict[str, object],
) -> None:
    h, writer, ann = with_writer()
    admin = h.db.insert("admin@example.com", roles=("user", "admin"))
    check = RoleCheck.of(as_admin(admin))
    await h.service.update_user(
        principal=as_admin(admin),
        request=UpdateUserInput(user_id=str(ann.id), etag="", patch=UserPatch(**patch)),  # type: ignore[arg-type]
        role_check=check,
    )
    assert check.passed is True
    assert [c.role_check for c in writer.changes] == ([check] if "display_name" in patch else [])


@pytest.mark.parametrize("patch", [{"display_name": "Ann"}, {"roles": ("user", "admin")}])
async def test_a_write_whose_role_check_fails_is_token_revoked_and_changes_nothing(
    patch: dict[str, object],
) -> None:
    h, ann = with_ann()
    demoted = h.db.insert("demoted@example.com", roles=("user",))
    check = RoleCheck.of(as_admin(demoted))
    with pytest.raises(TokenRevoked):
        await h.service.update_user(
            principal=as_admin(demoted),
            request=UpdateUserInput(user_id=str(ann.id), etag="", patch=UserPatch(**patch)),  # type: ignore[arg-type]
            role_check=check,
        )
    assert check.passed is False
    assert h.db.user(ann.id) == ann
