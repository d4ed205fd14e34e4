"""UserRepository.import_batch on PostgreSQL (one INSERT ... SELECT FROM
unnest(...) ON CONFLICT DO NOTHING per batch), and the UserImporter on top
of it: clashes inside and outside the batch, case variants, what a batch
leaves behind on its connection, and what a cancelled import leaves in the
database and the pool."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc.adapters.unit_of_work import make_uow_factory
from usersvc.domain.bulk_import import ImportedUser
from usersvc.domain.models import User
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.services.bulk_import import ImportRow, UserImporter

UserMaker = Callable[..., Awaitable[User]]
# Well-formed bcrypt hashes (the importer checks the form, never the password).
FAKE_HASH = "$2b$04$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"
OTHER_HASH = "$2y$12$abcdefghijklmnopqrstuu5Zk6d2uQ7g4QKJvLr7b3g3ZxJQkYx5e"


def imported(email: str, **fields: Any) -> ImportedUser:
    values: dict[str, Any] = {
        "email": email,
        "password_hash": FAKE_HASH,
        "display_name": "",
        "roles": ("user",),
        "labels": {},
    }
    values.update(fields)
    return ImportedUser(**values)


async def import_batch(uow_factory: UnitOfWorkFactory, users: Sequence[ImportedUser]) -> list[bool]:
    async with uow_factory() as uow:
        inserted = await uow.users.import_batch(users)
        await uow.commit()
    return inserted


async def stored(engine: AsyncEngine) -> dict[str, dict[str, Any]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT email, password_hash, display_name, roles, labels, create_time, "
                "update_time, version FROM users"
            )
        )
        return {row.email: dict(row._mapping) for row in rows}


# -- the batch -------------------------------------------------------------------------------


async def test_every_field_is_stored_and_the_hash_exactly_as_given(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    created = datetime(2019, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)

    inserted = await import_batch(
        uow_factory,
        [
            imported(
                "ann@example.com",
                password_hash=OTHER_HASH,
                display_name="Ann",
                roles=("admin", "user"),
                labels={"team": "payments", "note": 'quote " and \\ é'},
                create_time=created,
            )
        ],
    )

    row = (await stored(engine))["ann@example.com"]
    assert inserted == [True]
    assert (row["password_hash"], row["display_name"], row["roles"]) == (
        OTHER_HASH,
        "Ann",
        ["admin", "user"],
    )
    assert row["labels"] == {"team": "payments", "note": 'quote " and \\ é'}
    assert (row["create_time"], row["version"]) == (created, 1)
    assert row["update_time"] >= created


async def test_without_a_create_time_the_user_is_created_now(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)

    await import_batch(uow_factory, [imported("ann@example.com")])

    row = (await stored(engine))["ann@example.com"]
    assert row["create_time"] == row["update_time"]
    assert row["create_time"] > before


async def test_a_create_time_after_the_databases_clock_is_lowered_to_it(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    await import_batch(
        uow_factory,
        [imported("ann@example.com", create_time=datetime.now(UTC) + timedelta(days=1))],
    )

    row = (await stored(engine))["ann@example.com"]
    assert row["create_time"] <= row["update_time"]


async def test_emails_taken_by_stored_users_are_skipped_whatever_their_case(
    uow_factory: UnitOfWorkFactory, make_user: UserMaker, engine: AsyncEngine
) -> None:
    await make_user(email="taken@example.com")
    await make_user(email="deleted@example.com")
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE users SET delete_time = now() WHERE email = 'deleted@example.com'")
        )

    inserted = await import_batch(
        uow_factory,
        [
            imported("first@example.com"),
            imported("TAKEN@example.com"),
            imported("deleted@example.com"),
            imported("last@example.com"),
        ],
    )

    assert inserted == [True, False, False, True]
    assert set(await stored(engine)) == {
        "taken@example.com",
        "deleted@example.com",
        "first@example.com",
        "last@example.com",
    }


async def test_of_two_users_of_one_batch_with_the_same_email_the_earlier_one_wins(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    users = [imported(f"user{n}@example.com", display_name=f"#{n}") for n in range(500)]
    users.append(imported("USER17@example.com", display_name="later"))
    users.insert(3, imported("user400@Example.com", display_name="earlier"))

    inserted = await import_batch(uow_factory, users)

    assert inserted.count(False) == 2
    assert [i for i, done in enumerate(inserted) if not done] == [401, 501]
    names = {email.lower(): row["display_name"] for email, row in (await stored(engine)).items()}
    assert (names["user17@example.com"], names["user400@example.com"]) == ("#17", "earlier")


async def test_an_empty_batch_writes_nothing(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    assert await import_batch(uow_factory, []) == []
    assert await stored(engine) == {}


async def test_a_batch_rolled_back_leaves_no_user(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    async with uow_factory() as uow:
        assert await uow.users.import_batch([imported("ann@example.com")]) == [True]
        await uow.rollback()

    assert await stored(engine) == {}


# -- what a batch leaves on its connection ---------------------------------------------------


@pytest.mark.parametrize("pooling", [False, True], ids=["direct", "transaction-pooling"])
async def test_consecutive_batches_of_any_size_share_one_connection(
    make_engine: Callable[..., AsyncEngine], engine: AsyncEngine, pooling: bool
) -> None:
    one = make_engine(db_transaction_pooling=pooling, db_pool_size=1, db_max_overflow=0)
    uow_factory = make_uow_factory(one)

    results = [
        await import_batch(uow_factory, [imported(f"u{b}-{n}@example.com") for n in range(size)])
        for b, size in enumerate((50, 1, 2000, 50))
    ]

    assert [(len(r), all(r)) for r in results] == [(50, True), (1, True), (2000, True), (50, True)]
    assert len(await stored(engine)) == 2101


async def test_roles_are_stored_as_given_whatever_characters_they_hold(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    # The service only ever passes known roles; the repository must still
    # not read a role as array syntax.
    odd = ("user", 'a"b', "c\\d", "e,f", "{g}", "NULL", "")

    await import_batch(uow_factory, [imported("ann@example.com", roles=odd)])

    assert (await stored(engine))["ann@example.com"]["roles"] == list(odd)


async def test_in_transaction_pooling_mode_no_prepared_statement_outlives_a_batch(
    make_engine: Callable[..., AsyncEngine],
) -> None:
    one = make_engine(db_transaction_pooling=True, db_pool_size=1, db_max_overflow=0)

    await import_batch(make_uow_factory(one), [imported("ann@example.com")])

    async with one.connect() as connection:
        prepared = await connection.execute(text("SELECT count(*) FROM pg_prepared_statements"))
        assert prepared.scalar_one() == 0


# -- the importer on the database ------------------------------------------------------------


def rows(count: int, *, start: int = 0, prefix: str = "user") -> list[ImportRow]:
    return [
        ImportRow(email=f"{prefix}{n}@example.com", password_hash=FAKE_HASH)
        for n in range(start, start + count)
    ]


async def stream(items: Sequence[ImportRow]) -> Any:
    for item in items:
        yield item


async def test_an_import_of_many_batches_stores_every_row_once(
    uow_factory: UnitOfWorkFactory, engine: AsyncEngine
) -> None:
    items = rows(2500)
    items.insert(1000, ImportRow(email="USER5@example.com", password_hash=FAKE_HASH))
    items.insert(2200, ImportRow(email="user2100@example.com", password_hash=FAKE_HASH))

    result = await UserImporter(uow_factory=uow_factory, batch_size=700).run(stream(items))

    assert (result.imported_count, result.failed_count) == (2500, 2)
    assert [(e.row, e.reason) for e in result.errors] == [
        (1000, "EMAIL_ALREADY_EXISTS"),
        (2200, "EMAIL_ALREADY_EXISTS"),
    ]
    assert len(await stored(engine)) == 2500


async def _hold_email(engine: AsyncEngine, email: str) -> Any:
    """A transaction that has inserted ``email`` and not committed: an
    import of the same email waits for it (in the INSERT ... SELECT)."""
    connection = await engine.connect()
    transaction = await connection.begin()
    await connection.execute(
        text(
            "INSERT INTO users (id, email, password_hash, roles) "
            "VALUES (gen_random_uuid(), :email, :hash, ARRAY['user'])"
        ),
        {"email": email, "hash": FAKE_HASH},
    )
    return connection, transaction


async def test_a_cancelled_import_keeps_committed_batches_rolls_back_the_one_in_flight(
    make_engine: Callable[..., AsyncEngine],
    engine: AsyncEngine,
    wait_for_lock_waiters: Callable[[int], Awaitable[None]],
) -> None:
    service_engine = make_engine(db_pool_size=2, db_max_overflow=0)
    importer = UserImporter(uow_factory=make_uow_factory(service_engine), batch_size=3)
    held = ImportRow(email="held@example.com", password_hash=FAKE_HASH)
    items = [*rows(3), *rows(2, start=3), held]
    connection, transaction = await _hold_email(engine, "held@example.com")
    try:
        task = asyncio.create_task(importer.run(stream(items)))
        await wait_for_lock_waiters(1)

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        await transaction.rollback()
        await connection.close()

    assert set(await stored(engine)) == {f"user{n}@example.com" for n in range(3)}
    assert service_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    again = await importer.run(stream(items))
    assert (again.imported_count, again.failed_count) == (3, 3)
