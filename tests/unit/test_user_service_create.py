"""UserService.create_user and batch_create_users, idempotency included."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence

import pytest
from fakes import (
    FakePasswordHasher,
    FakeUnitOfWork,
    as_admin,
    as_mtls_service,
    as_service_account,
    as_user,
    user_service,
)

from usersvc.domain.errors import (
    EmailAlreadyExists,
    InvalidArgument,
    PermissionDenied,
    WeakPassword,
)
from usersvc.domain.models import ANONYMOUS, Principal, User, UserPatch, uuid7
from usersvc.domain.ports import IdempotencyRecord
from usersvc.services.inputs import CreateUserInput, UpdateUserInput

PASSWORD = "a perfectly fine passphrase"


def new(email: str = "ann@example.com", **fields: object) -> CreateUserInput:
    return CreateUserInput(email=email, password=fields.pop("password", PASSWORD), **fields)  # type: ignore[arg-type]


def fields_of(error: InvalidArgument) -> list[str]:
    return [v.field for v in error.violations]


# -- create_user ------------------------------------------------------------------------


async def test_anyone_may_sign_up_when_sign_up_is_enabled() -> None:
    h = user_service()
    user = await h.service.create_user(
        principal=ANONYMOUS,
        request=new(" Ann@Example.COM ", display_name="  Ann  ", labels={"team": "payments"}),
    )
    assert (user.email, user.display_name, user.roles) == ("ann@example.com", "Ann", ("user",))
    assert user.labels == {"team": "payments"}
    assert h.db.user(user.id) == user


async def test_the_password_is_stored_only_as_its_hash() -> None:
    h = user_service()
    user = await h.service.create_user(principal=ANONYMOUS, request=new())
    assert h.db.password_hash(user.id) == FakePasswordHasher.hash_at(PASSWORD, 4)


async def test_sign_up_is_refused_when_disabled() -> None:
    h = user_service(allow_signup=False)
    with pytest.raises(PermissionDenied, match="sign-up"):
        await h.service.create_user(principal=ANONYMOUS, request=new())
    assert h.db.rows == {}


async def test_a_plain_user_cannot_create_accounts_when_sign_up_is_disabled() -> None:
    h = user_service(allow_signup=False)
    with pytest.raises(PermissionDenied):
        await h.service.create_user(principal=as_user(uuid7()), request=new())


@pytest.mark.parametrize("principal", [as_admin(), as_service_account(), as_mtls_service()])
async def test_admins_and_services_create_users_when_sign_up_is_disabled(
    principal: Principal,
) -> None:
    h = user_service(allow_signup=False)
    user = await h.service.create_user(principal=principal, request=new())
    assert user.roles == ("user",)


async def test_permission_is_decided_before_validation() -> None:
    h = user_service()
    with pytest.raises(PermissionDenied, match="only admins"):
        await h.service.create_user(
            principal=ANONYMOUS, request=new("not an email", password="x", roles=("admin",))
        )


async def test_admins_grant_any_known_role() -> None:
    h = user_service()
    user = await h.service.create_user(
        principal=as_admin(), request=new(roles=("service", "admin"))
    )
    assert user.roles == ("admin", "service", "user")


@pytest.mark.parametrize("role", ["admin", "service"])
async def test_services_may_grant_only_the_user_role(role: str) -> None:
    h = user_service()
    with pytest.raises(PermissionDenied):
        await h.service.create_user(principal=as_service_account(), request=new(roles=(role,)))


async def test_an_unknown_role_is_an_invalid_argument_for_admins() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await h.service.create_user(principal=as_admin(), request=new(roles=("root",)))
    assert fields_of(caught.value) == ["roles[0]"]


async def test_every_bad_field_is_reported_at_once() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await h.service.create_user(
            principal=ANONYMOUS,
            request=new("nope", display_name="x" * 201, labels={"Bad Key": "v"}, request_id="\n"),
        )
    assert fields_of(caught.value) == ["email", "display_name", "labels", "request_id"]


async def test_a_weak_password_alone_is_reported_as_weak_password() -> None:
    h = user_service()
    with pytest.raises(WeakPassword) as caught:
        await h.service.create_user(principal=ANONYMOUS, request=new(password="password123"))
    assert fields_of(caught.value) == ["password"]


async def test_other_bad_fields_win_over_a_weak_password_and_include_it() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument) as caught:
        await h.service.create_user(principal=ANONYMOUS, request=new("nope", password="short"))
    assert type(caught.value) is InvalidArgument
    assert fields_of(caught.value) == ["email", "password"]


async def test_the_password_may_not_be_the_email_local_part() -> None:
    h = user_service()
    with pytest.raises(WeakPassword):
        await h.service.create_user(
            principal=ANONYMOUS, request=new("verylongname@example.com", password="VeryLongName")
        )


async def test_nothing_is_hashed_when_validation_fails() -> None:
    h = user_service()
    with pytest.raises(InvalidArgument):
        await h.service.create_user(principal=ANONYMOUS, request=new("nope"))
    assert h.hasher.hashed == 0


async def test_passwords_are_hashed_while_no_unit_of_work_is_open() -> None:
    h = user_service()
    await h.service.create_user(principal=ANONYMOUS, request=new())
    assert h.hasher.units_open_while_hashing == [0]


async def test_an_email_taken_in_another_case_is_refused() -> None:
    h = user_service()
    h.db.insert("ann@example.com")
    with pytest.raises(EmailAlreadyExists) as caught:
        await h.service.create_user(principal=ANONYMOUS, request=new("ANN@example.com"))
    assert caught.value.metadata["field"] == "email"
    assert len(h.db.rows) == 1


async def test_a_deleted_users_email_stays_taken() -> None:
    h = user_service()
    h.db.insert("ann@example.com", deleted=True)
    with pytest.raises(EmailAlreadyExists):
        await h.service.create_user(principal=as_admin(), request=new())


# -- idempotency of create_user -----------------------------------------------------------


async def test_a_retry_with_the_same_request_id_returns_the_first_user() -> None:
    h = user_service()
    first = await h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1"))
    again = await h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1"))
    assert again == first
    assert len(h.db.rows) == 1
    assert h.hasher.hashed == 1


async def test_a_retry_returns_the_first_response_even_after_the_user_changed() -> None:
    h = user_service()
    admin = as_admin()
    first = await h.service.create_user(principal=admin, request=new(request_id="r-1"))
    await h.service.update_user(
        principal=admin,
        request=UpdateUserInput(
            user_id=str(first.id), etag="", patch=UserPatch(display_name="Changed")
        ),
    )
    again = await h.service.create_user(principal=admin, request=new(request_id="r-1"))
    assert again == first


async def test_reusing_a_request_id_for_another_request_is_refused() -> None:
    h = user_service()
    admin = as_admin()
    await h.service.create_user(principal=admin, request=new(request_id="r-1"))
    with pytest.raises(InvalidArgument) as caught:
        await h.service.create_user(
            principal=admin, request=new("bob@example.com", request_id="r-1")
        )
    assert fields_of(caught.value) == ["request_id"]
    assert len(h.db.rows) == 1


async def test_anonymous_sign_ups_with_one_request_id_but_other_bodies_are_separate() -> None:
    h = user_service()
    first = await h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1"))
    second = await h.service.create_user(
        principal=ANONYMOUS, request=new("bob@example.com", request_id="r-1")
    )
    assert (first.email, second.email) == ("ann@example.com", "bob@example.com")
    assert len(h.db.rows) == 2


async def test_an_anonymous_retry_returns_the_first_answer_only_with_the_same_password() -> None:
    h = user_service()
    first = await h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1"))
    again = await h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1"))
    assert again == first
    with pytest.raises(InvalidArgument) as caught:
        await h.service.create_user(
            principal=ANONYMOUS,
            request=new(request_id="r-1", password="Another-strong-pass-99"),
        )
    assert fields_of(caught.value) == ["request_id"]
    assert len(h.db.rows) == 1


async def test_request_ids_are_scoped_per_caller() -> None:
    h = user_service()
    first_admin, second_admin = as_admin(), as_admin()
    await h.service.create_user(principal=first_admin, request=new(request_id="r-1"))
    second = await h.service.create_user(
        principal=second_admin, request=new("bob@example.com", request_id="r-1")
    )
    assert second.email == "bob@example.com"


async def test_without_a_request_id_nothing_is_remembered() -> None:
    h = user_service()
    await h.service.create_user(principal=ANONYMOUS, request=new())
    assert h.db.idempotency == {}


async def test_the_stored_response_holds_nothing_derived_from_the_password() -> None:
    h = user_service()
    await h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1"))
    (record,) = h.db.idempotency.values()
    stored = repr(record)
    assert PASSWORD not in stored
    assert hashlib.sha256(PASSWORD.encode()).hexdigest() not in stored
    assert FakePasswordHasher.hash_at(PASSWORD, 4) not in stored


async def test_the_loser_of_a_race_on_the_email_returns_the_winners_response() -> None:
    h = user_service(yield_while_hashing=True)
    first, second = await asyncio.gather(
        h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1")),
        h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1")),
    )
    assert first == second
    assert len(h.db.rows) == 1


async def test_the_loser_of_a_race_on_the_key_returns_the_winners_response() -> None:
    h = user_service()
    winner = h.db.insert("winner-placeholder@example.com")

    def concurrent_winner(uow: FakeUnitOfWork) -> None:
        # Another transaction stores the same key and request first.
        ((key, record),) = [(k, uow.keys[k]) for k in uow.new_keys]
        h.db.idempotency[key] = IdempotencyRecord(record.fingerprint, (winner,))

    h.db.before_next_commit.append(concurrent_winner)
    result = await h.service.create_user(principal=as_admin(), request=new(request_id="r-1"))
    assert result == winner
    assert [u.email for u in (r.user for r in h.db.rows.values())] == [winner.email]


async def test_a_race_lost_to_another_request_with_the_same_key_is_refused() -> None:
    h = user_service()

    def concurrent_other_request(uow: FakeUnitOfWork) -> None:
        ((key, _),) = [(k, uow.keys[k]) for k in uow.new_keys]
        h.db.idempotency[key] = IdempotencyRecord("another-fingerprint", ())

    h.db.before_next_commit.append(concurrent_other_request)
    with pytest.raises(InvalidArgument) as caught:
        await h.service.create_user(principal=ANONYMOUS, request=new(request_id="r-1"))
    assert fields_of(caught.value) == ["request_id"]
    assert h.db.rows == {}


# -- batch_create_users ------------------------------------------------------------------


def batch(*emails: str, **fields: object) -> list[CreateUserInput]:
    return [new(email, **fields) for email in emails]


async def create_batch(
    requests: Sequence[CreateUserInput], principal: Principal | None = None, request_id: str = ""
) -> list[User]:
    h = user_service()
    return await h.service.batch_create_users(
        principal=principal or as_admin(), requests=requests, request_id=request_id
    )


async def test_a_batch_creates_every_user_in_request_order() -> None:
    h = user_service()
    users = await h.service.batch_create_users(
        principal=as_service_account(),
        requests=batch("c@example.com", "A@example.com", "b@example.com"),
        request_id="",
    )
    assert [u.email for u in users] == ["c@example.com", "a@example.com", "b@example.com"]
    assert len(h.db.rows) == 3


@pytest.mark.parametrize("principal", [ANONYMOUS, as_user(uuid7())])
async def test_only_admins_and_services_batch_create(principal: Principal) -> None:
    with pytest.raises(PermissionDenied):
        await create_batch(batch("a@example.com"), principal)


async def test_a_service_asking_for_admin_in_any_item_is_refused_naming_it() -> None:
    requests = [new("a@example.com"), new("b@example.com", roles=("admin",))]
    with pytest.raises(PermissionDenied, match=r"requests\[1\]\.roles"):
        await create_batch(requests, as_service_account())


@pytest.mark.parametrize("size", [0, 1001])
async def test_a_batch_holds_one_to_a_thousand_items(size: int) -> None:
    requests = [new(f"u{i}@example.com") for i in range(size)]
    with pytest.raises(InvalidArgument) as caught:
        await create_batch(requests)
    assert fields_of(caught.value) == ["requests"]


async def test_a_batch_of_a_thousand_is_accepted() -> None:
    users = await create_batch([new(f"u{i}@example.com") for i in range(1000)])
    assert len(users) == 1000


async def test_items_must_not_carry_their_own_request_id() -> None:
    with pytest.raises(InvalidArgument) as caught:
        await create_batch([new("a@example.com"), new("b@example.com", request_id="x")])
    assert fields_of(caught.value) == ["requests[1].request_id"]


async def test_a_repeated_email_is_reported_on_the_later_item() -> None:
    with pytest.raises(InvalidArgument) as caught:
        await create_batch(batch("a@example.com", "b@example.com", "A@EXAMPLE.com"))
    assert fields_of(caught.value) == ["requests[2].email"]
    assert "requests[0]" in caught.value.violations[0].description


async def test_violations_name_the_item_and_field() -> None:
    requests = [new("a@example.com"), new("b@example.com"), new("c@example.com"), new("bad")]
    requests[1] = new("b@example.com", password="short")
    with pytest.raises(InvalidArgument) as caught:
        await create_batch(requests)
    assert fields_of(caught.value) == ["requests[3].email", "requests[1].password"]


async def test_weak_passwords_alone_are_weak_password_per_item() -> None:
    with pytest.raises(WeakPassword) as caught:
        await create_batch([new("a@example.com"), new("b@example.com", password="qwerty123")])
    assert fields_of(caught.value) == ["requests[1].password"]


async def test_a_batch_is_all_or_nothing() -> None:
    h = user_service()
    h.db.insert("taken@example.com")
    with pytest.raises(EmailAlreadyExists) as caught:
        await h.service.batch_create_users(
            principal=as_admin(),
            requests=batch("new@example.com", "Taken@example.com", "other@example.com"),
            request_id="",
        )
    assert caught.value.metadata["field"] == "requests[1].email"
    assert [r.user.email for r in h.db.rows.values()] == ["taken@example.com"]


async def test_a_retried_batch_returns_the_first_users_and_creates_nothing() -> None:
    h = user_service()
    admin = as_admin()
    requests = batch("a@example.com", "b@example.com")
    first = await h.service.batch_create_users(
        principal=admin, requests=requests, request_id="batch-1"
    )
    again = await h.service.batch_create_users(
        principal=admin, requests=requests, request_id="batch-1"
    )
    assert again == first
    assert len(h.db.rows) == 2
    assert h.hasher.hashed == 2


async def test_a_batch_request_id_reused_for_another_batch_is_refused() -> None:
    h = user_service()
    admin = as_admin()
    await h.service.batch_create_users(
        principal=admin, requests=batch("a@example.com"), request_id="batch-1"
    )
    with pytest.raises(InvalidArgument) as caught:
        await h.service.batch_create_users(
            principal=admin, requests=batch("b@example.com"), request_id="batch-1"
        )
    assert fields_of(caught.value) == ["request_id"]


async def test_the_same_request_id_on_create_and_batch_create_does_not_collide() -> None:
    h = user_service()
    admin = as_admin()
    await h.service.create_user(principal=admin, request=new(request_id="k"))
    users = await h.service.batch_create_users(
        principal=admin, requests=batch("b@example.com"), request_id="k"
    )
    assert [u.email for u in users] == ["b@example.com"]
