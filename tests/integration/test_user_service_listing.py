"""UserService.list_users on PostgreSQL: what filtering, ordering and keyset
paging mean is the database's business, so it is tested here, not on fakes
(the unit tests cover the service's own checks and page tokens)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.read_lane import SqlAlchemyUserReader
from usersvc.domain.bulk_import import ImportedUser
from usersvc.domain.models import ROLE_ADMIN, ROLE_USER, Principal, PrincipalKind, User
from usersvc.domain.passwords import PasswordPolicy
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.services.inputs import ListUsersInput, UserListResult
from usersvc.services.passwords import BcryptPasswordHasher
from usersvc.services.sessions import SessionLifetimes, SessionRevoker
from usersvc.services.users import UserService

UserMaker = Callable[..., Awaitable[User]]

# A syntactically valid bcrypt hash; listing never looks inside it.
FAKE_HASH = "$2b$04$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"

ADMIN = Principal(
    kind=PrincipalKind.USER,
    subject="0190a4b2-6c1e-7cc3-8a1b-00000000a11e",
    roles=frozenset({ROLE_USER, ROLE_ADMIN}),
    session_id="session",
    token_id="token",
)


# Pages without a filter are read on the read lane in the server; each
# test runs on both paths.
@pytest.fixture(params=["unit of work", "read lane"])
async def service(
    request: pytest.FixtureRequest, uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> AsyncIterator[UserService]:
    hasher = BcryptPasswordHasher(rounds=4, max_threads=1)
    yield UserService(
        uow_factory=uow_factory,
        reader=SqlAlchemyUserReader(engine) if request.param == "read lane" else None,
        hasher=hasher,
        password_policy=PasswordPolicy(),
        allow_signup=True,
        sessions=SessionRevoker(
            lifetimes=SessionLifetimes(access_ttl_seconds=600, refresh_ttl_seconds=3600),
            on_revoked=None,
        ),
    )
    hasher.close()


async def list_page(service: UserService, **fields: object) -> UserListResult:
    return await service.list_users(
        principal=ADMIN,
        request=ListUsersInput(**fields),  # type: ignore[arg-type]
    )


async def test_paging_visits_every_user_once_in_creation_order(
    service: UserService, make_user: UserMaker
) -> None:
    users = [await make_user(email=f"user{i}@example.com") for i in range(7)]
    seen: list[User] = []
    token = ""
    while True:
        page = await list_page(service, page_size=3, page_token=token)
        seen.extend(page.users)
        assert page.total_size == 7
        token = page.next_page_token
        if not token:
            break
    assert seen == users


async def test_users_created_while_paging_neither_repeat_nor_hide_earlier_rows(
    service: UserService, make_user: UserMaker, uow_factory: UnitOfWorkFactory
) -> None:
    users = [await make_user(email=f"user{i}@example.com") for i in range(6)]
    first = await list_page(service, page_size=3)
    # Imported with a create time before every listed user's: it sorts
    # before the cursor, so the next page neither shows it nor shifts.
    late = ImportedUser(
        email="late@example.com",
        password_hash=FAKE_HASH,
        display_name="",
        roles=(ROLE_USER,),
        labels={},
        create_time=users[0].create_time - timedelta(days=1),
    )
    async with uow_factory() as uow:
        assert await uow.users.import_batch([late]) == [True]
        await uow.commit()
    second = await list_page(service, page_size=3, page_token=first.next_page_token)
    assert [*first.users, *second.users] == users


async def test_the_filter_selects_users(
    service: UserService, make_user: UserMaker, uow_factory: UnitOfWorkFactory
) -> None:
    await make_user(email="ann@payments.example.com", labels={"team": "payments"})
    bob = await make_user(
        email="bob@example.com", labels={"team": "search"}, roles=(ROLE_USER, ROLE_ADMIN)
    )
    cid = await make_user(email="cid@example.com")
    async with uow_factory() as uow:
        await uow.users.set_disabled(cid.id, True)
        await uow.commit()
    page = await list_page(
        service, filter='state = STATE_ACTIVE AND roles:"admin" AND labels.team:*'
    )
    assert (page.users, page.total_size) == ((bob,), 1)


async def test_order_by_email_descending(service: UserService, make_user: UserMaker) -> None:
    for name in ("b", "c", "a"):
        await make_user(email=f"{name}@example.com")
    page = await list_page(service, order_by="email desc")
    assert [u.email for u in page.users] == ["c@example.com", "b@example.com", "a@example.com"]


async def test_deleted_users_are_left_out_by_default(
    service: UserService, make_user: UserMaker, uow_factory: UnitOfWorkFactory
) -> None:
    live = await make_user(email="live@example.com")
    gone = await make_user(email="gone@example.com")
    async with uow_factory() as uow:
        await uow.users.set_deleted(gone.id, True)
        await uow.commit()
    page = await list_page(service)
    assert (page.users, page.total_size) == ((live,), 1)


async def test_admins_list_deleted_users_with_show_deleted(
    service: UserService, make_user: UserMaker, uow_factory: UnitOfWorkFactory
) -> None:
    await make_user(email="live@example.com")
    gone = await make_user(email="gone@example.com")
    async with uow_factory() as uow:
        await uow.users.set_deleted(gone.id, True)
        await uow.commit()
    page = await list_page(service, show_deleted=True)
    assert page.total_size == 2
    assert {u.email for u in page.users} == {"live@example.com", "gone@example.com"}
