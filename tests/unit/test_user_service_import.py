"""UserService.import_users and the UserImporter behind it, on fakes: who
may import, per-row errors that never stop the stream, batches committed
one by one, and a response bounded however many rows fail."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable

import pytest
from fakes import (
    FakeDatabase,
    as_admin,
    as_mtls_service,
    as_service_account,
    as_user,
    user_service,
)

from usersvc.domain.errors import DatabaseUnavailable, InvalidArgument, PermissionDenied
from usersvc.domain.models import ANONYMOUS, Principal, uuid7
from usersvc.services.bulk_import import ROWS_PER_YIELD, ImportResult, ImportRow, UserImporter

HASH = "$2b$04$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"
OTHER_HASH = "$2y$10$Svru9xUp63Tg3ojPEEy/buT7mQ9cR71FGvUmXAJSjrBpPfx/2rjB6"


def good(n: int, **fields: object) -> ImportRow:
    values: dict[str, object] = {"email": f"user{n}@example.com", "password_hash": HASH}
    values.update(fields)
    return ImportRow(**values)  # type: ignore[arg-type]


def bad_hash(n: int) -> ImportRow:
    return good(n, password_hash="not a hash")


class Stream:
    """The rows of an import as the servicer hands them over; remembers
    whether anyone started reading."""

    def __init__(self, rows: Iterable[ImportRow], *, fail_after: int | None = None) -> None:
        self.rows = list(rows)
        self.fail_after = fail_after
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[ImportRow]:
        for row in self.rows:
            if self.fail_after is not None and self.read == self.fail_after:
                raise InvalidArgument.single("users", "a broken message")
            self.read += 1
            yield row


def importer(db: FakeDatabase, *, batch_size: int = 3, max_errors: int = 100) -> UserImporter:
    return UserImporter(uow_factory=db.uow, batch_size=batch_size, max_reported_errors=max_errors)


def failures(result: ImportResult) -> list[tuple[int, str, str]]:
    return [(e.row, e.field, e.reason) for e in result.errors]


def stored_emails(db: FakeDatabase) -> set[str]:
    return {row.user.email for row in db.rows.values()}


# -- who may import ------------------------------------------------------------------------


async def test_an_admin_imports_users_with_their_hashes_as_sent() -> None:
    h = user_service()

    result = await h.service.import_users(
        principal=as_admin(), rows=Stream([good(1), good(2, password_hash=OTHER_HASH)])
    )

    assert (result.imported_count, result.failed_count, result.errors) == (2, 0, ())
    hashes = {row.user.email: row.password_hash for row in h.db.rows.values()}
    assert hashes == {"user1@example.com": HASH, "user2@example.com": OTHER_HASH}


@pytest.mark.parametrize(
    "principal",
    [
        ANONYMOUS,
        as_user(uuid7()),
        as_service_account(),
        as_mtls_service(),
    ],
    ids=["anonymous", "user", "service-account", "mtls-service"],
)
async def test_anyone_but_an_admin_is_refused_before_a_row_is_read(principal: Principal) -> None:
    h = user_service()
    stream = Stream([good(1)])

    with pytest.raises(PermissionDenied):
        await h.service.import_users(principal=principal, rows=stream)

    assert (stream.read, h.db.rows) == (0, {})


# -- per-row errors --------------------------------------------------------------------------


async def test_bad_rows_are_reported_with_their_index_and_the_stream_goes_on() -> None:
    db = FakeDatabase()

    result = await importer(db).run(
        Stream([good(0), bad_hash(1), good(2, email="nope"), good(3), bad_hash(4), good(5)])
    )

    assert (result.imported_count, result.failed_count) == (3, 3)
    assert failures(result) == [
        (1, "password_hash", "INVALID_PASSWORD_HASH"),
        (2, "email", "INVALID_ARGUMENT"),
        (4, "password_hash", "INVALID_PASSWORD_HASH"),
    ]
    assert stored_emails(db) == {"user0@example.com", "user3@example.com", "user5@example.com"}


async def test_an_email_already_stored_is_a_row_error_whatever_its_case() -> None:
    db = FakeDatabase()
    db.insert("taken@example.com")

    result = await importer(db).run(Stream([good(0), good(1, email="TAKEN@Example.com")]))

    assert (result.imported_count, failures(result)) == (1, [(1, "email", "EMAIL_ALREADY_EXISTS")])


async def test_an_email_repeated_within_a_batch_fails_the_later_row() -> None:
    db = FakeDatabase()

    result = await importer(db, batch_size=10).run(
        Stream([good(0), good(1), good(2, email="USER0@example.com")])
    )

    assert failures(result) == [(2, "email", "EMAIL_ALREADY_EXISTS")]
    assert "row 0" in result.errors[0].description
    assert len(db.rows) == 2


async def test_an_email_repeated_in_a_later_batch_fails_the_later_row() -> None:
    db = FakeDatabase()

    result = await importer(db, batch_size=2).run(
        Stream([good(0), good(1), good(2), good(3, email="user1@example.com")])
    )

    assert (result.imported_count, failures(result)) == (3, [(3, "email", "EMAIL_ALREADY_EXISTS")])


async def test_a_row_with_the_email_of_an_earlier_bad_row_is_imported() -> None:
    db = FakeDatabase()

    result = await importer(db).run(Stream([bad_hash(0), good(1, email="user0@example.com")]))

    assert (result.imported_count, failures(result)) == (
        1,
        [(0, "password_hash", "INVALID_PASSWORD_HASH")],
    )


# -- batches ---------------------------------------------------------------------------------


async def test_rows_are_written_in_batches_each_committed_on_its_own() -> None:
    db = FakeDatabase()

    result = await importer(db, batch_size=3).run(Stream(good(n) for n in range(8)))

    assert result.imported_count == 8
    assert (db.import_batches, db.commits) == ([3, 3, 2], 3)


async def test_rows_with_large_labels_are_written_in_smaller_batches() -> None:
    db = FakeDatabase()
    # Each row: 17 + 60 characters of email and hash, 1,000 of labels; a
    # batch is full once it holds 3 of them, far below its 100 rows.
    labels = {f"k{n}": "v" * 98 for n in range(10)}
    rows = [good(n, labels=labels) for n in range(7)]
    budget = UserImporter(uow_factory=db.uow, batch_size=100, batch_characters=3000)

    result = await budget.run(Stream(rows))

    assert result.imported_count == 7
    assert db.import_batches == [3, 3, 1]


async def test_bad_rows_do_not_count_towards_a_batch() -> None:
    db = FakeDatabase()

    await importer(db, batch_size=2).run(Stream([good(0), bad_hash(1), good(2), good(3)]))

    assert db.import_batches == [2, 1]


async def test_an_empty_stream_imports_nothing_and_writes_nothing() -> None:
    db = FakeDatabase()

    result = await importer(db).run(Stream([]))

    assert (result.imported_count, result.failed_count, result.errors) == (0, 0, ())
    assert (result.errors_truncated, db.commits) == (False, 0)


async def test_a_stream_that_fails_keeps_the_batches_committed_before() -> None:
    db = FakeDatabase()

    with pytest.raises(InvalidArgument):
        await importer(db, batch_size=2).run(Stream((good(n) for n in range(5)), fail_after=4))

    assert stored_emails(db) == {f"user{n}@example.com" for n in range(4)}


async def test_a_database_failure_ends_the_import_with_that_error() -> None:
    db = FakeDatabase()

    def fail(_: object) -> None:
        raise DatabaseUnavailable()

    db.before_next_commit.append(fail)

    with pytest.raises(DatabaseUnavailable):
        await importer(db, batch_size=2).run(Stream(good(n) for n in range(5)))

    assert db.rows == {}


async def test_a_retry_of_the_same_stream_reports_the_imported_rows_as_taken() -> None:
    db = FakeDatabase()
    rows = [good(0), bad_hash(1), good(2)]
    await importer(db).run(Stream(rows))

    again = await importer(db).run(Stream(rows))

    assert (again.imported_count, failures(again)) == (
        0,
        [
            (0, "email", "EMAIL_ALREADY_EXISTS"),
            (1, "password_hash", "INVALID_PASSWORD_HASH"),
            (2, "email", "EMAIL_ALREADY_EXISTS"),
        ],
    )


# -- a bounded response ----------------------------------------------------------------------


async def test_only_the_first_errors_are_listed_and_the_rest_counted() -> None:
    db = FakeDatabase()

    result = await importer(db, max_errors=3).run(Stream(bad_hash(n) for n in range(10)))

    assert (result.failed_count, [e.row for e in result.errors]) == (10, [0, 1, 2])
    assert result.errors_truncated is True


async def test_the_listed_errors_are_the_lowest_rows_even_when_found_out_of_order() -> None:
    # Row 0's clash is known only when its batch is written, after row 2
    # (the next batch) was already found bad.
    db = FakeDatabase()
    db.insert("user0@example.com")

    result = await importer(db, batch_size=2, max_errors=1).run(
        Stream([good(0), good(1), bad_hash(2), good(3)])
    )

    assert (result.failed_count, failures(result)) == (
        2,
        [(0, "email", "EMAIL_ALREADY_EXISTS")],
    )


async def test_errors_up_to_the_cap_are_not_truncated() -> None:
    db = FakeDatabase()

    result = await importer(db, max_errors=3).run(Stream(bad_hash(n) for n in range(3)))

    assert (len(result.errors), result.errors_truncated) == (3, False)


def test_a_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        UserImporter(uow_factory=FakeDatabase().uow, batch_size=0)
    with pytest.raises(ValueError, match="batch_characters"):
        UserImporter(uow_factory=FakeDatabase().uow, batch_characters=0)


async def test_rows_arriving_together_leave_the_event_loop_to_other_tasks() -> None:
    # One message of 10,000 rows arrives at once: the stream hands them over
    # without ever waiting. Validating them must still let other calls run.
    rows = 10_000
    ticks = 0

    async def other_call() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_call())
    try:
        result = await importer(FakeDatabase(), batch_size=rows).run(
            Stream(good(n) for n in range(rows))
        )
    finally:
        ticker.cancel()
    assert result.imported_count == rows
    assert ticks >= rows // ROWS_PER_YIELD
