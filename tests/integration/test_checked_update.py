"""UpdateUser's one statement (usersvc.adapters.repository.user_update)
against PostgreSQL, through a unit of work and through the write lane
(usersvc.adapters.write_lane): each rule that refuses a write and what the
outcome says about it, the event and its changed fields, and concurrent
writers of one row under READ COMMITTED."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support.users import patch_user
from usersvc.adapters.orm import events_table, user_codes_table
from usersvc.adapters.write_lane import SqlAlchemyUserWriter
from usersvc.domain.codes import CodeKind
from usersvc.domain.errors import DatabaseUnavailable, EmailAlreadyExists, TokenRevoked
from usersvc.domain.events import CallContext, EventDraft, EventType
from usersvc.domain.models import NO_VERSION, Principal, PrincipalKind, User, UserPatch
from usersvc.domain.ports import UnitOfWorkFactory, UpdateOutcome, UserUpdate
from usersvc.domain.role_checks import RoleCheck

UserMaker = Callable[..., Awaitable[User]]
Update = Callable[[UserUpdate], Coroutine[Any, Any, UpdateOutcome]]

UPDATED = (EventDraft(EventType.USER_UPDATED),)
CALL = CallContext(actor="actor-1", request_id="req-1")


def through_lane(engine: AsyncEngine) -> Update:
    writer = SqlAlchemyUserWriter(engine, call_context=lambda: CALL)

    async def run(change: UserUpdate) -> UpdateOutcome:
        return await writer.update(change, events=UPDATED)

    return run


def through_unit_of_work(uow_factory: UnitOfWorkFactory) -> Update:
    async def run(change: UserUpdate) -> UpdateOutcome:
        async with uow_factory() as uow:
            outcome = await uow.users.update_checked(change, events=UPDATED)
            await uow.commit()
        return outcome

    return run


@pytest.fixture
def uow_with_call(engine: AsyncEngine) -> UnitOfWorkFactory:
    from usersvc.adapters.unit_of_work import make_uow_factory

    return make_uow_factory(engine, call_context=lambda: CALL)


@pytest.fixture(params=["lane", "unit of work"])
def run_update(request: Any, engine: AsyncEngine, uow_with_call: UnitOfWorkFactory) -> Update:
    """The statement run by the write lane, then by a unit of work."""
    if request.param == "lane":
        return through_lane(engine)
    return through_unit_of_work(uow_with_call)


async def events_of(engine: AsyncEngine, user_id: uuid.UUID) -> list[Any]:
    async with engine.connect() as connection:
        result = await connection.execute(
            select(events_table)
            .where(events_table.c.user_id == user_id)
            .order_by(events_table.c.position)
        )
        return list(result.mappings().all())


async def stored(uow_factory: UnitOfWorkFactory, user_id: uuid.UUID) -> User | None:
    async with uow_factory() as uow:
        return await uow.users.get(user_id)


# -- each rule ------------------------------------------------------------------------


async def test_a_write_returns_the_version_it_replaced_and_the_new_one(
    run_update: Update, engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user(display_name="Old", labels={"team": "a"})

    outcome = await run_update(
        UserUpdate(user.id, UserPatch(display_name="New", labels={"team": "a"}))
    )

    assert outcome.before == user
    assert outcome.after is not None
    assert (outcome.after.display_name, outcome.after.version) == ("New", user.version + 1)
    assert outcome.after.update_time > user.update_time
    assert outcome.caller_is_admin
    [written] = await events_of(engine, user.id)
    # Labels were patched to the value they had: not a changed field.
    assert written["changed_fields"] == ["display_name"]
    assert (written["type"], written["actor"], written["request_id"]) == (
        EventType.USER_UPDATED.value,
        "actor-1",
        "req-1",
    )
    assert written["user_snapshot"]["display_name"] == "New"
    assert written["user_snapshot"]["version"] == user.version + 1


async def test_a_missing_user_is_no_row_and_writes_nothing(
    run_update: Update, engine: AsyncEngine
) -> None:
    missing = uuid.uuid4()

    outcome = await run_update(UserUpdate(missing, UserPatch(display_name="x")))

    assert outcome == UpdateOutcome(before=None, after=None)
    assert await events_of(engine, missing) == []


async def test_a_deleted_user_is_refused_and_the_outcome_shows_it_deleted(
    run_update: Update,
    engine: AsyncEngine,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
) -> None:
    user = await make_user()
    async with uow_factory() as uow:
        deleted = await uow.users.set_deleted(user.id, True)
        await uow.commit()

    outcome = await run_update(UserUpdate(user.id, UserPatch(display_name="x")))

    assert (outcome.before, outcome.after) == (deleted, None)
    assert await stored(uow_factory, user.id) == deleted
    assert await events_of(engine, user.id) == []


async def test_a_stale_version_is_refused_and_the_outcome_shows_the_current_one(
    run_update: Update,
    engine: AsyncEngine,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
) -> None:
    user = await make_user()
    first = await run_update(UserUpdate(user.id, UserPatch(display_name="first")))
    assert first.after is not None

    outcome = await run_update(
        UserUpdate(user.id, UserPatch(display_name="second"), expected_version=user.version)
    )

    assert (outcome.before, outcome.after) == (first.after, None)
    assert await stored(uow_factory, user.id) == first.after
    assert len(await events_of(engine, user.id)) == 1


async def test_the_current_version_lets_the_write_through(
    run_update: Update, make_user: UserMaker
) -> None:
    user = await make_user()

    outcome = await run_update(
        UserUpdate(user.id, UserPatch(display_name="x"), expected_version=user.version)
    )

    assert outcome.after is not None
    assert outcome.after.version == user.version + 1


async def test_no_version_matches_no_row(run_update: Update, make_user: UserMaker) -> None:
    user = await make_user()

    outcome = await run_update(
        UserUpdate(user.id, UserPatch(display_name="x"), expected_version=NO_VERSION)
    )

    assert (outcome.before, outcome.after) == (user, None)


@pytest.mark.parametrize(
    ("caller_state", "allowed"),
    [("admin", True), ("not admin", False), ("disabled", False), ("deleted", False)],
)
async def test_a_role_change_needs_a_caller_stored_as_an_active_admin(
    caller_state: str,
    allowed: bool,
    uow_with_call: UnitOfWorkFactory,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
) -> None:
    roles = ("user",) if caller_state == "not admin" else ("user", "admin")
    caller, target = await make_user(roles=roles), await make_user()
    if caller_state in ("disabled", "deleted"):
        async with uow_factory() as uow:
            if caller_state == "disabled":
                await uow.users.set_disabled(caller.id, True)
            else:
                await uow.users.set_deleted(caller.id, True)
            await uow.commit()
    change = UserUpdate(target.id, UserPatch(roles=("user", "admin")), admin_caller=caller.id)

    outcome = await through_unit_of_work(uow_with_call)(change)

    assert outcome.caller_is_admin is allowed
    assert outcome.before == target
    assert (outcome.after is not None) is allowed
    expected_roles = ("admin", "user") if allowed else target.roles
    current = await stored(uow_factory, target.id)
    assert current is not None
    assert tuple(sorted(current.roles)) == expected_roles


async def test_an_admin_changing_its_own_roles_is_judged_by_its_own_locked_row(
    uow_with_call: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    admin, demoted = await make_user(roles=("user", "admin")), await make_user()
    run = through_unit_of_work(uow_with_call)

    kept = await run(UserUpdate(admin.id, UserPatch(roles=("admin",)), admin_caller=admin.id))
    refused = await run(
        UserUpdate(demoted.id, UserPatch(roles=("admin",)), admin_caller=demoted.id)
    )

    assert (kept.caller_is_admin, kept.after is not None) == (True, True)
    assert (refused.caller_is_admin, refused.after) == (False, None)


def admin_token_check(account_id: uuid.UUID) -> RoleCheck:
    return RoleCheck.of(
        Principal(
            kind=PrincipalKind.USER,
            subject=str(account_id),
            roles=frozenset({"user", "admin"}),
            session_id="s1",
        )
    )


@pytest.mark.parametrize("account", ["still admin", "demoted", "disabled", "deleted", "missing"])
async def test_the_token_rule_writes_only_while_the_account_backs_the_token(
    account: str,
    run_update: Update,
    uow_factory: UnitOfWorkFactory,
    engine: AsyncEngine,
    make_user: UserMaker,
) -> None:
    caller, target = await make_user(roles=("user", "admin")), await make_user()
    async with uow_factory() as uow:
        if account == "demoted":
            await patch_user(uow, caller.id, UserPatch(roles=("user",)))
        elif account == "disabled":
            await uow.users.set_disabled(caller.id, True)
        elif account == "deleted":
            await uow.users.set_deleted(caller.id, True)
        await uow.commit()
    check = admin_token_check(uuid.uuid4() if account == "missing" else caller.id)
    change = UserUpdate(target.id, UserPatch(display_name="New"), role_check=check)

    if account == "still admin":
        outcome = await run_update(change)
        assert outcome.after is not None
        assert outcome.after.display_name == "New"
    else:
        with pytest.raises(TokenRevoked):
            await run_update(change)
        assert await stored(uow_factory, target.id) == target
        assert await events_of(engine, target.id) == []
    assert check.passed is (account == "still admin")


async def test_a_token_that_no_longer_holds_is_refused_before_a_missing_user_is_told(
    run_update: Update, uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    admin, demoted = await make_user(roles=("user", "admin")), await make_user()
    nobody = uuid.uuid4()

    held = await run_update(
        UserUpdate(nobody, UserPatch(display_name="X"), role_check=admin_token_check(admin.id))
    )
    with pytest.raises(TokenRevoked):
        await run_update(
            UserUpdate(
                nobody, UserPatch(display_name="X"), role_check=admin_token_check(demoted.id)
            )
        )

    assert (held.before, held.after) == (None, None)


async def test_the_token_rule_on_the_callers_own_row_is_judged_by_its_locked_row(
    run_update: Update, uow_factory: UnitOfWorkFactory, make_user: UserMaker
) -> None:
    admin, demoted = await make_user(roles=("user", "admin")), await make_user()

    kept = await run_update(
        UserUpdate(admin.id, UserPatch(display_name="Me"), role_check=admin_token_check(admin.id))
    )
    with pytest.raises(TokenRevoked):
        await run_update(
            UserUpdate(
                demoted.id, UserPatch(display_name="Me"), role_check=admin_token_check(demoted.id)
            )
        )

    assert kept.after is not None
    assert await stored(uow_factory, demoted.id) == demoted


async def _verified_with_an_open_code(uow_factory: UnitOfWorkFactory, user: User) -> User:
    """``user`` with a verified email and an open password-reset code."""
    async with uow_factory() as uow:
        expire = datetime.now(UTC) + timedelta(minutes=10)
        await uow.accounts.replace_code(user.id, CodeKind.PASSWORD_RESET, b"h" * 32, expire)
        verified = await uow.accounts.set_email_verified(user.id)
        await uow.commit()
    assert verified.email_verified
    return verified


async def _open_codes(engine: AsyncEngine, user_id: uuid.UUID) -> int:
    async with engine.connect() as connection:
        count = await connection.scalar(
            select(text("count(*)"))
            .select_from(user_codes_table)
            .where(user_codes_table.c.user_id == user_id, user_codes_table.c.void_time.is_(None))
        )
    return int(count or 0)


async def test_a_new_email_is_unverified_and_voids_the_open_codes(
    uow_with_call: UnitOfWorkFactory,
    uow_factory: UnitOfWorkFactory,
    engine: AsyncEngine,
    make_user: UserMaker,
) -> None:
    user = await _verified_with_an_open_code(uow_factory, await make_user())

    outcome = await through_unit_of_work(uow_with_call)(
        UserUpdate(user.id, UserPatch(email="moved@example.com"))
    )

    assert outcome.after is not None
    assert (outcome.after.email, outcome.after.email_verified) == ("moved@example.com", False)
    open_codes = await _open_codes(engine, user.id)
    assert open_codes == 0
    [written] = await events_of(engine, user.id)
    assert written["changed_fields"] == ["email"]


async def test_the_same_email_again_keeps_the_codes_and_the_verification(
    uow_with_call: UnitOfWorkFactory,
    uow_factory: UnitOfWorkFactory,
    engine: AsyncEngine,
    make_user: UserMaker,
) -> None:
    user = await _verified_with_an_open_code(uow_factory, await make_user())

    outcome = await through_unit_of_work(uow_with_call)(
        UserUpdate(user.id, UserPatch(email=user.email))
    )

    assert outcome.after is not None
    assert outcome.after.email_verified
    open_codes = await _open_codes(engine, user.id)
    assert open_codes == 1
    [written] = await events_of(engine, user.id)
    assert written["changed_fields"] == []


async def test_a_taken_email_is_email_already_exists_and_nothing_is_written(
    uow_with_call: UnitOfWorkFactory,
    uow_factory: UnitOfWorkFactory,
    engine: AsyncEngine,
    make_user: UserMaker,
) -> None:
    taken, user = await make_user(), await make_user()

    with pytest.raises(EmailAlreadyExists) as caught:
        await through_unit_of_work(uow_with_call)(
            UserUpdate(user.id, UserPatch(email=taken.email.upper()))
        )

    assert caught.value.metadata == {"email": taken.email.upper()}
    assert await stored(uow_factory, user.id) == user
    assert await events_of(engine, user.id) == []


@pytest.mark.parametrize(
    "patch", [UserPatch(email="x@example.com"), UserPatch(roles=("user",))], ids=str
)
async def test_the_lane_refuses_patches_that_need_a_unit_of_work(
    engine: AsyncEngine, make_user: UserMaker, patch: UserPatch
) -> None:
    user = await make_user()
    with pytest.raises(ValueError, match="unit of work"):
        await SqlAlchemyUserWriter(engine).update(UserUpdate(user.id, patch))


# -- the lane's round trips and connections -----------------------------------------


def record_driver_queries(engine: AsyncEngine) -> tuple[list[str], Callable[[], None]]:
    """The queries asyncpg runs on ``engine``'s connections checked out from
    now on (the lane's statement, the pre-ping, BEGIN and COMMIT), and a
    function that stops recording."""
    queries: list[str] = []
    watched: list[Any] = []

    def record(query: Any) -> None:
        queries.append(" ".join(str(query.query).split()))

    def watch(dbapi_connection: Any, *_: Any) -> None:
        driver = dbapi_connection.driver_connection
        if driver not in watched:
            watched.append(driver)
            driver.add_query_logger(record)

    event.listen(engine.sync_engine.pool, "checkout", watch, insert=True)

    def stop() -> None:
        event.remove(engine.sync_engine.pool, "checkout", watch)
        for driver in watched:
            driver.remove_query_logger(record)

    return queries, stop


async def test_an_update_through_the_lane_is_one_statement_without_begin_commit_or_ping(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    writer = SqlAlchemyUserWriter(engine)
    await writer.update(UserUpdate(user.id, UserPatch(display_name="warm")), events=UPDATED)

    queries, stop = record_driver_queries(engine)
    try:
        outcome = await writer.update(
            UserUpdate(user.id, UserPatch(display_name="x")), events=UPDATED
        )
        # asyncpg hands logged queries to the loggers on the next loop turn.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        stop()

    assert outcome.after is not None
    assert len(queries) == 1
    assert queries[0].startswith("WITH before AS")
    assert engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_through_a_transaction_pool_the_lane_wraps_its_statement_in_a_transaction(
    engine: AsyncEngine, make_user: UserMaker
) -> None:
    user = await make_user()
    writer = SqlAlchemyUserWriter(engine, transaction_pooling=True)

    queries, stop = record_driver_queries(engine)
    try:
        outcome = await writer.update(UserUpdate(user.id, UserPatch(display_name="x")))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    finally:
        stop()

    assert outcome.after is not None
    assert queries[0] == "BEGIN;"
    assert queries[1].startswith("WITH before AS")
    assert queries[-1] == "COMMIT;"


async def kill_idle_connections(admin: AsyncEngine) -> int:
    async with admin.connect() as connection:
        result = await connection.execute(
            text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND state = 'idle' "
                "AND application_name = 'usersvc' AND pid <> pg_backend_pid()"
            )
        )
        return int(result.scalar_one())


async def test_a_write_on_a_pooled_connection_the_server_closed_goes_to_a_fresh_one(
    make_engine: Callable[..., AsyncEngine],
    engine: AsyncEngine,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
) -> None:
    user = await make_user()
    lane_engine = make_engine(db_pool_size=1, db_max_overflow=0)
    writer = SqlAlchemyUserWriter(lane_engine)
    drivers: list[Any] = []
    event.listen(
        lane_engine.sync_engine.pool,
        "checkout",
        lambda dbapi_connection, *_: drivers.append(dbapi_connection.driver_connection),
    )
    await writer.update(UserUpdate(user.id, UserPatch(display_name="pooled")))
    [driver] = drivers
    closed = asyncio.Event()
    driver.add_termination_listener(lambda _: closed.set())
    assert await kill_idle_connections(engine) >= 1
    async with asyncio.timeout(10):
        await closed.wait()  # the driver has read the server's goodbye
    assert driver.is_closed()

    outcome = await writer.update(UserUpdate(user.id, UserPatch(display_name="after")))

    assert outcome.after is not None
    current = await stored(uow_factory, user.id)
    assert current is not None
    assert (current.display_name, current.version) == ("after", user.version + 2)


async def test_a_write_whose_connection_dies_during_the_statement_is_unavailable_not_repeated(
    make_engine: Callable[..., AsyncEngine],
    engine: AsyncEngine,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
    wait_for_lock_waiters: Callable[[int], Awaitable[None]],
) -> None:
    user = await make_user()
    writer = SqlAlchemyUserWriter(make_engine(db_pool_size=1, db_max_overflow=0))
    async with uow_factory() as holder:
        await holder.users.get(user.id, for_update=True)  # the write waits on this lock
        write = asyncio.create_task(
            writer.update(UserUpdate(user.id, UserPatch(display_name="lost")))
        )
        await wait_for_lock_waiters(1)
        async with engine.connect() as connection:
            await connection.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        with pytest.raises(DatabaseUnavailable):
            await write
        await holder.rollback()

    assert await stored(uow_factory, user.id) == user


async def test_a_write_cancelled_while_it_waits_returns_nothing_broken_to_the_pool(
    make_engine: Callable[..., AsyncEngine],
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
    wait_for_lock_waiters: Callable[[int], Awaitable[None]],
) -> None:
    user = await make_user()
    lane_engine = make_engine(db_pool_size=1, db_max_overflow=0)
    writer = SqlAlchemyUserWriter(lane_engine)
    async with uow_factory() as holder:
        await holder.users.get(user.id, for_update=True)
        write = asyncio.create_task(
            writer.update(UserUpdate(user.id, UserPatch(display_name="cancelled")))
        )
        await wait_for_lock_waiters(1)
        write.cancel()
        with pytest.raises(asyncio.CancelledError):
            await write
        await holder.rollback()

    assert lane_engine.sync_engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    outcome = await writer.update(UserUpdate(user.id, UserPatch(display_name="next")))
    assert outcome.after is not None


# -- READ COMMITTED: concurrent writers of one row ------------------------------------


async def test_a_write_waiting_on_the_row_judges_the_version_committed_while_it_waited(
    run_update: Update,
    engine: AsyncEngine,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
    wait_for_lock_waiters: Callable[[int], Awaitable[None]],
) -> None:
    # The waiting statement's snapshot has the user deleted and named "Old";
    # the version committed meanwhile is live and named "New" already.
    user = await make_user(display_name="Old")
    async with uow_factory() as uow:
        await uow.users.set_deleted(user.id, True)
        await uow.commit()
    async with uow_factory() as holder:
        await holder.users.set_deleted(user.id, False)
        restored = await patch_user(holder, user.id, UserPatch(display_name="New"))
        write = asyncio.create_task(
            run_update(UserUpdate(user.id, UserPatch(display_name="New", labels={"k": "v"})))
        )
        await wait_for_lock_waiters(1)
        await holder.commit()
    outcome = await write

    assert outcome.before == restored
    assert outcome.after is not None
    assert outcome.after.version == restored.version + 1
    written = await events_of(engine, user.id)
    assert written[-1]["changed_fields"] == ["labels"]


async def test_an_etag_current_when_the_write_began_but_not_when_it_ran_is_refused(
    run_update: Update,
    uow_factory: UnitOfWorkFactory,
    make_user: UserMaker,
    wait_for_lock_waiters: Callable[[int], Awaitable[None]],
) -> None:
    user = await make_user()
    async with uow_factory() as holder:
        moved = await patch_user(holder, user.id, UserPatch(display_name="moved"))
        write = asyncio.create_task(
            run_update(
                UserUpdate(user.id, UserPatch(display_name="x"), expected_version=user.version)
            )
        )
        await wait_for_lock_waiters(1)
        await holder.commit()
    outcome = await write

    assert (outcome.before, outcome.after) == (moved, None)
    assert await stored(uow_factory, user.id) == moved


async def test_concurrent_writers_of_one_row_each_see_the_one_before_and_lose_nothing(
    run_update: Update, engine: AsyncEngine, make_user: UserMaker
) -> None:
    writers = 16
    user = await make_user(display_name="A", labels={})
    # Half set display_name "A", half "B"; every writer adds its own label
    # key: what each changes depends on which writer came before it.
    changes = [
        UserUpdate(user.id, UserPatch(display_name="AB"[n % 2], labels={f"w{n}": "x"}))
        for n in range(writers)
    ]

    outcomes = await asyncio.gather(*(run_update(change) for change in changes))

    chain = sorted(outcomes, key=lambda outcome: outcome.after.version)  # type: ignore[union-attr]
    versions = [outcome.after.version for outcome in chain]  # type: ignore[union-attr]
    assert versions == list(range(user.version + 1, user.version + 1 + writers))
    assert chain[0].before == user
    for earlier, later in itertools.pairwise(chain):
        assert later.before == earlier.after  # no write missed the one before it
    written = await events_of(engine, user.id)
    assert len(written) == writers
    by_version = {row["user_snapshot"]["version"]: row for row in written}
    for outcome, change in zip(outcomes, changes, strict=True):
        assert outcome.before is not None
        assert outcome.after is not None
        expected = list(change.patch.changed_fields(outcome.before))
        assert by_version[outcome.after.version]["changed_fields"] == expected
        assert outcome.after.labels == change.patch.labels
