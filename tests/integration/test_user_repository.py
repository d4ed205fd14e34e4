"""SqlAlchemyUserRepository against PostgreSQL: what each method stores and
returns, and which domain errors it raises."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.users import patch_user
from usersvc.adapters.repository.users import MAX_ROWS_PER_INSERT
from usersvc.domain.errors import EmailAlreadyExists, UserNotFound
from usersvc.domain.models import NewUser, User, UserPatch, UserState
from usersvc.domain.ports import UnitOfWorkFactory

NewUserFactory = Callable[..., NewUser]
UserMaker = Callable[..., Awaitable[User]]

HASH = "$2b$04$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"

# --- add ---------------------------------------------------------------------


async def test_add_returns_the_stored_user_at_version_one(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    new = new_user(
        email="ada@example.com", display_name="Ada", roles=("user", "admin"), labels={"team": "x"}
    )
    async with uow_factory() as uow:
        user = await uow.users.add(new)
        await uow.commit()
    assert (user.email, user.display_name, user.roles, user.labels, user.version) == (
        "ada@example.com",
        "Ada",
        ("user", "admin"),
        {"team": "x"},
        1,
    )
    assert user.state is UserState.ACTIVE
    assert user.create_time.tzinfo is not None
    assert user.update_time == user.create_time


async def test_add_assigns_time_ordered_uuid7_ids(make_user: UserMaker) -> None:
    first = await make_user()
    second = await make_user()
    assert first.id.version == 7
    assert first.id < second.id


async def test_added_user_is_readable_in_a_later_unit_of_work(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(labels={"k": "v"})
    async with uow_factory() as uow:
        assert await uow.users.get(user.id) == user


async def test_add_of_an_email_differing_only_in_case_raises_email_already_exists(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, new_user: NewUserFactory
) -> None:
    await make_user(email="bob@example.com")
    async with uow_factory() as uow:
        with pytest.raises(EmailAlreadyExists) as caught:
            await uow.users.add(new_user(email="BOB@Example.COM"))
    assert caught.value.metadata == {"email": "BOB@Example.COM"}


async def test_add_of_the_email_of_a_deleted_user_raises_email_already_exists(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, new_user: NewUserFactory
) -> None:
    user = await make_user(email="gone@example.com")
    async with uow_factory() as uow:
        await uow.users.set_deleted(user.id, True)
        await uow.commit()
    async with uow_factory() as uow:
        with pytest.raises(EmailAlreadyExists):
            await uow.users.add(new_user(email="gone@example.com"))


async def test_a_rejected_add_leaves_the_transaction_usable(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, new_user: NewUserFactory
) -> None:
    await make_user(email="taken@example.com")
    async with uow_factory() as uow:
        with pytest.raises(EmailAlreadyExists):
            await uow.users.add(new_user(email="taken@example.com"))
        other = await uow.users.add(new_user(email="free@example.com"))
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.users.get(other.id) == other


# --- add_many ----------------------------------------------------------------


async def test_add_many_returns_users_in_input_order(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    emails = [f"z{n}@example.com" for n in range(5)] + ["a@example.com", "m@example.com"]
    async with uow_factory() as uow:
        users = await uow.users.add_many([new_user(email=email) for email in emails])
        await uow.commit()
    assert [user.email for user in users] == emails


async def test_add_many_of_nothing_returns_nothing(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.users.add_many([]) == []


async def test_add_many_clashing_with_a_stored_user_names_the_clashing_email(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, new_user: NewUserFactory
) -> None:
    await make_user(email="old@example.com")
    batch = [new_user(email="new1@example.com"), new_user(email="Old@example.com")]
    async with uow_factory() as uow:
        with pytest.raises(EmailAlreadyExists) as caught:
            await uow.users.add_many(batch)
    assert caught.value.metadata == {"email": "Old@example.com"}


async def test_add_many_with_a_duplicate_inside_the_batch_names_the_later_duplicate(
    uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    batch = [
        new_user(email="twin@example.com"),
        new_user(email="solo@example.com"),
        new_user(email="TWIN@example.com"),
    ]
    async with uow_factory() as uow:
        with pytest.raises(EmailAlreadyExists) as caught:
            await uow.users.add_many(batch)
    assert caught.value.metadata == {"email": "TWIN@example.com"}


async def test_add_many_sends_one_insert_statement_per_thousand_users(
    engine: AsyncEngine, uow_factory: UnitOfWorkFactory, new_user: NewUserFactory
) -> None:
    inserts: list[str] = []

    def record(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            inserts.append(statement)

    batch = [new_user() for _ in range(MAX_ROWS_PER_INSERT + 1)]
    event.listen(engine.sync_engine, "before_cursor_execute", record)
    try:
        async with uow_factory() as uow:
            users = await uow.users.add_many(batch)
            await uow.commit()
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", record)
    assert len(inserts) == 2
    assert [user.email for user in users] == [new.email for new in batch]


# --- reads -------------------------------------------------------------------


async def test_get_of_an_unknown_id_returns_none(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.users.get(uuid.uuid4()) is None


async def test_get_returns_deleted_users(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        await uow.users.set_deleted(user.id, True)
        await uow.commit()
    async with uow_factory() as uow:
        found = await uow.users.get(user.id)
    assert found is not None
    assert found.state is UserState.DELETED


async def test_get_many_returns_only_the_users_that_exist(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    first = await make_user()
    second = await make_user()
    async with uow_factory() as uow:
        found = await uow.users.get_many([second.id, uuid.uuid4(), first.id, first.id])
    assert {user.id for user in found} == {first.id, second.id}
    assert len(found) == 2


async def test_get_many_of_no_ids_returns_nothing(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.users.get_many([]) == []


async def test_get_by_email_ignores_case(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(email="carol@example.com")
    async with uow_factory() as uow:
        assert await uow.users.get_by_email("CAROL@EXAMPLE.com") == user
        assert await uow.users.get_by_email("nobody@example.com") is None


async def test_get_credentials_by_email_returns_the_user_and_hash(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(email="dave@example.com", password_hash=HASH)
    async with uow_factory() as uow:
        credentials = await uow.users.get_credentials_by_email("Dave@example.com")
    assert credentials is not None
    assert credentials.user == user
    assert credentials.password_hash == HASH


async def test_get_credentials_by_id_returns_the_user_and_hash(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(password_hash=HASH)
    async with uow_factory() as uow:
        credentials = await uow.users.get_credentials(user.id)
        missing = await uow.users.get_credentials(uuid.uuid4())
    assert credentials is not None
    assert (credentials.user, credentials.password_hash) == (user, HASH)
    assert missing is None


# --- writes ------------------------------------------------------------------


async def test_update_changes_only_the_patched_fields_and_bumps_the_version(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(display_name="Eve", roles=("user",), labels={"a": "1"})
    async with uow_factory() as uow:
        updated = await patch_user(uow, user.id, UserPatch(display_name="Eve2"))
        await uow.commit()
    assert updated.display_name == "Eve2"
    assert (updated.email, updated.roles, updated.labels) == (user.email, user.roles, user.labels)
    assert updated.version == user.version + 1
    assert updated.update_time > user.update_time
    assert updated.create_time == user.create_time


async def test_update_replaces_email_roles_and_labels(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user(labels={"a": "1"})
    patch = UserPatch(email="renamed@example.com", roles=("user", "admin"), labels={"b": "2"})
    async with uow_factory() as uow:
        updated = await patch_user(uow, user.id, patch)
        await uow.commit()
    assert (updated.email, updated.roles, updated.labels) == (
        "renamed@example.com",
        ("user", "admin"),
        {"b": "2"},
    )


async def test_update_to_another_users_email_raises_email_already_exists(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    await make_user(email="first@example.com")
    second = await make_user(email="second@example.com")
    async with uow_factory() as uow:
        with pytest.raises(EmailAlreadyExists) as caught:
            await patch_user(uow, second.id, UserPatch(email="FIRST@example.com"))
    assert caught.value.metadata == {"email": "FIRST@example.com"}


async def test_update_of_an_unknown_user_raises_user_not_found(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(UserNotFound):
            await patch_user(uow, uuid.uuid4(), UserPatch(display_name="x"))


async def test_set_password_hash_stores_the_new_hash_and_bumps_the_version(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        updated = await uow.users.set_password_hash(user.id, "$2b$04$new")
        await uow.commit()
    async with uow_factory() as uow:
        credentials = await uow.users.get_credentials(user.id)
    assert credentials is not None
    assert credentials.password_hash == "$2b$04$new"
    assert updated.version == user.version + 1


async def test_set_disabled_sets_and_clears_the_disable_time(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        disabled = await uow.users.set_disabled(user.id, True)
        await uow.commit()
    async with uow_factory() as uow:
        enabled = await uow.users.set_disabled(user.id, False)
        await uow.commit()
    assert (disabled.state, disabled.disable_time is not None) == (UserState.DISABLED, True)
    assert (enabled.state, enabled.disable_time) == (UserState.ACTIVE, None)
    assert enabled.version == user.version + 2


async def test_disabling_twice_keeps_the_first_disable_time(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        first = await uow.users.set_disabled(user.id, True)
        await uow.commit()
    async with uow_factory() as uow:
        second = await uow.users.set_disabled(user.id, True)
        await uow.commit()
    assert second.disable_time == first.disable_time
    assert second.version == first.version + 1


async def test_set_deleted_sets_and_clears_the_delete_time(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        deleted = await uow.users.set_deleted(user.id, True)
        restored = await uow.users.set_deleted(user.id, False)
        await uow.commit()
    assert (deleted.state, deleted.delete_time is not None) == (UserState.DELETED, True)
    assert (restored.state, restored.delete_time) == (UserState.ACTIVE, None)


async def test_a_deleted_disabled_user_is_deleted_and_disabled_again_when_restored(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        await uow.users.set_disabled(user.id, True)
        deleted = await uow.users.set_deleted(user.id, True)
        restored = await uow.users.set_deleted(user.id, False)
        await uow.commit()
    assert (deleted.state, restored.state) == (UserState.DELETED, UserState.DISABLED)


@pytest.mark.parametrize("method", ["set_disabled", "set_deleted"])
async def test_state_changes_of_an_unknown_user_raise_user_not_found(
    uow_factory: UnitOfWorkFactory, method: str
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(UserNotFound):
            await getattr(uow.users, method)(uuid.uuid4(), True)


async def test_set_password_hash_of_an_unknown_user_raises_user_not_found(
    uow_factory: UnitOfWorkFactory,
) -> None:
    async with uow_factory() as uow:
        with pytest.raises(UserNotFound):
            await uow.users.set_password_hash(uuid.uuid4(), "$2b$04$x")


async def test_purge_erases_the_user_and_frees_the_email(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, new_user: NewUserFactory
) -> None:
    user = await make_user(email="purged@example.com")
    async with uow_factory() as uow:
        assert await uow.users.purge(user.id) is True
        await uow.commit()
    async with uow_factory() as uow:
        assert await uow.users.get(user.id) is None
        again = await uow.users.add(new_user(email="purged@example.com"))
    assert again.id != user.id


async def test_purge_of_an_unknown_user_returns_false(uow_factory: UnitOfWorkFactory) -> None:
    async with uow_factory() as uow:
        assert await uow.users.purge(uuid.uuid4()) is False
