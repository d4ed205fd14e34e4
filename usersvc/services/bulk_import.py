"""Importing users with existing bcrypt hashes: the use case behind
usersvc.v1.UserService.ImportUsers (UserService.import_users checks the
caller and hands the rows to UserImporter).

Rows arrive as a stream of any length, so nothing here grows with it: rows
are validated one by one and written in batches, each batch in a unit of
work of its own (a long import never holds one huge transaction, and what
was committed stays if the call ends early); at most one batch is being
written while the next is validated; and only the first
``max_reported_errors`` failed rows are kept for the response, the rest are
counted. A bad row or a taken email fails that row only.

Retrying after a failure is safe: the rows committed by the first attempt
meet the unique email index the second time and come back as
EMAIL_ALREADY_EXISTS, the others are imported.
"""

from __future__ import annotations

import asyncio
import heapq
from collections.abc import AsyncIterable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from usersvc.domain.bulk_import import (
    REASON_EMAIL_ALREADY_EXISTS,
    REASON_INVALID_ARGUMENT,
    REASON_INVALID_PASSWORD_HASH,
    ImportedUser,
    bcrypt_hash_problem,
)
from usersvc.domain.errors import FieldViolation
from usersvc.domain.events import EventDraft, EventType
from usersvc.domain.ports import UnitOfWorkFactory
from usersvc.domain.validation import (
    normalize_display_name,
    normalize_email,
    normalize_labels,
    normalize_roles,
)

# Rows per unit of work. Big enough that the statement, its round trip and
# the commit are paid for once per thousands of rows; small enough that a
# batch's transaction stays short (tens of milliseconds) and that a
# cancelled call loses little work. The database's throughput was flat from
# 1,000 to 5,000 (usersvc.adapters.repository.bulk_import).
DEFAULT_BATCH_SIZE = 2000
# Characters of user data (emails, hashes, names, roles, labels) per unit of
# work: the row count bounds batches of small rows, this bounds large ones.
# The driver encodes a statement's parameters in one step on the event loop
# (about 2 ms per MiB), and 2,000 users with the largest labels would be
# 40 MB in one statement: a loop held for most of a tenth of a second, and
# more than the default statement_timeout on a busy database.
DEFAULT_BATCH_CHARACTERS = 1024 * 1024
# Rows validated between two returns to the event loop. A message may hold
# 10,000 rows that arrive together; validating a row costs tens of
# microseconds, so without a pause a message held the loop for most of a
# second and every other call on the process (health included) waited.
# 32 rows keep each stretch to a few milliseconds: a call waiting on the
# loop waits for one stretch per await it makes.
ROWS_PER_YIELD = 32
# Bounds the response: a million bad rows still answer in a few hundred
# kilobytes.
MAX_REPORTED_ERRORS = 1000
EARLIEST_CREATE_TIME = datetime(1970, 1, 1, tzinfo=UTC)

# One user.created event per imported user, in the import's statement.
_IMPORTED = (EventDraft(EventType.USER_CREATED, attributes={"origin": "import"}),)


@dataclass(frozen=True, slots=True)
class ImportRow:
    """Raw, unvalidated fields of one imported user. A create_time the wire
    could not express as a datetime arrives as ``datetime.min`` (UTC), which
    validation refuses like any other time out of range."""

    email: str
    password_hash: str = field(repr=False)
    display_name: str = ""
    roles: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    create_time: datetime | None = None
    email_verified: bool = False


@dataclass(frozen=True, slots=True)
class ImportRowError:
    """Why row ``row`` (its index in the stream, from 0) was not imported;
    ``reason`` is one of usersvc.domain.bulk_import's REASON_* values."""

    row: int
    field: str
    reason: str
    description: str


@dataclass(frozen=True, slots=True)
class ImportResult:
    imported_count: int
    failed_count: int
    # The failed rows with the lowest indexes, in stream order.
    errors: tuple[ImportRowError, ...]

    @property
    def errors_truncated(self) -> bool:
        return self.failed_count > len(self.errors)


def validate_row(
    row: ImportRow, *, index: int, clock: Callable[[], datetime]
) -> ImportedUser | ImportRowError:
    """Row ``index`` as it will be stored, or the first problem found
    (fields in the order email, password_hash, display_name, roles, labels,
    create_time, which must not be after ``clock()``). The hash is checked,
    never changed. Raises nothing."""
    errors: list[FieldViolation] = []
    email = normalize_email(row.email, field="email", errors=errors)
    if errors:
        return _refusal(index, REASON_INVALID_ARGUMENT, errors[0])
    problem = bcrypt_hash_problem(row.password_hash)
    if problem is not None:
        return ImportRowError(index, "password_hash", REASON_INVALID_PASSWORD_HASH, problem)
    display_name = normalize_display_name(row.display_name, field="display_name", errors=errors)
    roles = normalize_roles(row.roles, field="roles", errors=errors)
    labels = normalize_labels(row.labels, field="labels", errors=errors)
    if errors:
        return _refusal(index, REASON_INVALID_ARGUMENT, errors[0])
    if row.create_time is not None and not EARLIEST_CREATE_TIME <= row.create_time <= clock():
        return ImportRowError(
            index,
            "create_time",
            REASON_INVALID_ARGUMENT,
            "must be between 1970-01-01T00:00:00Z and now",
        )
    return ImportedUser(
        email=email,
        password_hash=row.password_hash,
        display_name=display_name,
        roles=roles,
        labels=labels,
        create_time=row.create_time,
        email_verified=row.email_verified,
    )


def _refusal(index: int, reason: str, violation: FieldViolation) -> ImportRowError:
    return ImportRowError(index, violation.field, reason, violation.description)


class _Tally:
    """Counts, and the ``limit`` failed rows with the lowest indexes: rows
    fail out of order (a batch's clashes are known only after the next
    batch's rows were validated), so "the first" means by index."""

    def __init__(self, limit: int) -> None:
        self.imported = 0
        self.failed = 0
        self._limit = limit
        # A max-heap on the row index (stored negated): its top is the
        # kept error that goes first when a lower row fails.
        self._kept: list[tuple[int, ImportRowError]] = []

    def fail(self, error: ImportRowError) -> None:
        self.failed += 1
        if self._limit <= 0:
            return
        entry = (-error.row, error)
        if len(self._kept) < self._limit:
            heapq.heappush(self._kept, entry)
        elif error.row < -self._kept[0][0]:
            heapq.heapreplace(self._kept, entry)

    def result(self) -> ImportResult:
        errors = tuple(error for _, error in sorted(self._kept, key=lambda e: e[1].row))
        return ImportResult(imported_count=self.imported, failed_count=self.failed, errors=errors)


@dataclass
class _Batch:
    users: list[ImportedUser] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)  # each user's index in the stream
    # Normalised email -> row of the first user of the batch holding it.
    emails: dict[str, int] = field(default_factory=dict)
    # Of the users' strings (see _characters).
    characters: int = 0


def _characters(user: ImportedUser) -> int:
    return (
        len(user.email)
        + len(user.password_hash)
        + len(user.display_name)
        + sum(len(role) for role in user.roles)
        + sum(len(key) + len(value) for key, value in user.labels.items())
    )


class UserImporter:
    """Validates a stream of rows and writes the valid ones in batches of
    ``batch_size`` users (fewer when they hold ``batch_characters`` of data
    before that), each batch in its own unit of work from ``uow_factory``;
    ``clock`` (aware datetimes) bounds create_time."""

    def __init__(
        self,
        *,
        uow_factory: UnitOfWorkFactory,
        batch_size: int = DEFAULT_BATCH_SIZE,
        batch_characters: int = DEFAULT_BATCH_CHARACTERS,
        max_reported_errors: int = MAX_REPORTED_ERRORS,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        """Raises ValueError for a batch size or character budget below 1
        or a negative error limit."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if batch_characters < 1:
            raise ValueError(f"batch_characters must be at least 1, got {batch_characters}")
        if max_reported_errors < 0:
            raise ValueError(f"max_reported_errors must be >= 0, got {max_reported_errors}")
        self._uow_factory = uow_factory
        self._batch_size = batch_size
        self._batch_characters = batch_characters
        self._max_errors = max_reported_errors
        self._clock = clock

    async def run(self, rows: AsyncIterable[ImportRow]) -> ImportResult:
        """Import every row of ``rows``; the counts and the first failed rows.

        Batches committed before a failure stay. When iterating ``rows``
        fails, the batch being written is still committed before the error
        goes on; when the call is cancelled (a deadline, a client that went
        away), that batch is rolled back instead. Raises what iterating
        ``rows`` raises (then nothing more is read), DatabaseUnavailable.
        """
        tally = _Tally(self._max_errors)
        batch = _Batch()
        # The batch in the database while the next one is being validated.
        writing: asyncio.Task[None] | None = None
        try:
            index = 0
            async for row in rows:
                if index % ROWS_PER_YIELD == ROWS_PER_YIELD - 1:
                    await asyncio.sleep(0)
                outcome = validate_row(row, index=index, clock=self._clock)
                if isinstance(outcome, ImportRowError):
                    tally.fail(outcome)
                else:
                    self._add(batch, outcome, index, tally)
                    if (
                        len(batch.users) >= self._batch_size
                        or batch.characters >= self._batch_characters
                    ):
                        # Batches are written one after the other: a clash
                        # with a row of an earlier batch is only seen once
                        # that batch is committed.
                        if writing is not None:
                            await writing
                        writing = asyncio.create_task(self._write(batch, tally))
                        batch = _Batch()
                index += 1
            if writing is not None:
                await writing
            writing = None
            if batch.users:
                await self._write(batch, tally)
        except BaseException as error:
            if writing is not None:
                await _settle(writing, cancel=isinstance(error, asyncio.CancelledError))
            raise
        return tally.result()

    @staticmethod
    def _add(batch: _Batch, user: ImportedUser, index: int, tally: _Tally) -> None:
        earlier = batch.emails.setdefault(user.email, index)
        if earlier != index:
            tally.fail(
                ImportRowError(
                    index,
                    "email",
                    REASON_EMAIL_ALREADY_EXISTS,
                    f"the same email as row {earlier} of this import",
                )
            )
            return
        batch.users.append(user)
        batch.rows.append(index)
        batch.characters += _characters(user)

    async def _write(self, batch: _Batch, tally: _Tally) -> None:
        async with self._uow_factory() as uow:
            inserted = await uow.users.import_batch(batch.users, events=_IMPORTED)
            await uow.commit()
        _count(batch.rows, inserted, tally)


async def _settle(writing: asyncio.Task[None], *, cancel: bool) -> None:
    """Wait until the batch in flight is over: committed, or, with
    ``cancel``, rolled back (its unit of work returns the connection either
    way). Its own error is dropped: the one that ended the import is the
    one to report."""
    if cancel:
        writing.cancel()
    try:
        await asyncio.wait([writing])
    except asyncio.CancelledError:
        writing.cancel()
        raise
    finally:
        if writing.done() and not writing.cancelled():
            writing.exception()


def _count(rows: Sequence[int], inserted: Sequence[bool], tally: _Tally) -> None:
    for index, done in zip(rows, inserted, strict=True):
        if done:
            tally.imported += 1
        else:
            tally.fail(
                ImportRowError(
                    index,
                    "email",
                    REASON_EMAIL_ALREADY_EXISTS,
                    "email already registered (or imported by an earlier row of this import)",
                )
            )
