"""UserService.CreateUser end to end: sign-up, roles, validation, passwords."""

from __future__ import annotations

import asyncio
import uuid

import grpc

from .helpers import (
    World,
    assert_rich_error,
    create_request,
    decode_failure,
    expect_denied,
    expect_error,
    expect_invalid,
    new_email,
    user_pb2,
    user_service_pb2,
)


async def expect_weak_password(world: World, password: str) -> None:
    await expect_error(
        world.anonymous.users.CreateUser(create_request(world.recorder, password=password)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEAK_PASSWORD",
        fields=["password"],
    )


async def test_anonymous_sign_up_creates_an_active_plain_user(world: World) -> None:
    request = create_request(world.recorder, display_name="Carol", labels={"team": "payments"})

    user = (await world.anonymous.users.CreateUser(request)).user

    assert user.email == request.email
    assert user.display_name == "Carol"
    assert list(user.roles) == ["user"]
    assert user.state == user_pb2.User.STATE_ACTIVE
    assert dict(user.labels) == {"team": "payments"}
    assert user.etag
    assert user.create_time.seconds > 0
    assert user.update_time.seconds > 0
    assert not user.HasField("delete_time")


async def test_created_user_ids_are_time_ordered_uuid7(world: World) -> None:
    first = (await world.admin.users.CreateUser(create_request(world.recorder))).user
    second = (await world.admin.users.CreateUser(create_request(world.recorder))).user

    assert uuid.UUID(first.id).version == 7
    # The top 48 bits are Unix milliseconds; the rest is random.
    assert uuid.UUID(first.id).int >> 80 <= uuid.UUID(second.id).int >> 80


async def test_sign_up_with_explicit_user_role_is_allowed(world: World) -> None:
    request = create_request(world.recorder, roles=["user"])

    user = (await world.anonymous.users.CreateUser(request)).user

    assert list(user.roles) == ["user"]


async def test_sign_up_asking_for_admin_role_is_permission_denied(world: World) -> None:
    request = create_request(world.recorder, roles=["admin"])

    await expect_denied(world.anonymous.users.CreateUser(request))


async def test_created_email_is_stored_lower_cased(world: World) -> None:
    email = new_email("Mixed").replace("Mixed", "MiXeD").upper()

    user = (await world.admin.users.CreateUser(create_request(world.recorder, email=email))).user

    assert user.email == email.lower()


async def test_email_taken_in_another_case_is_already_exists(world: World) -> None:
    request = create_request(world.recorder, email=world.alice.email.upper())

    await expect_error(
        world.anonymous.users.CreateUser(request),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )


async def test_admin_may_create_an_admin(world: World) -> None:
    request = create_request(world.recorder, roles=["user", "admin"])

    user = (await world.admin.users.CreateUser(request)).user

    assert set(user.roles) == {"user", "admin"}


async def test_admin_may_create_a_service_account(world: World) -> None:
    request = create_request(world.recorder, roles=["service"])

    user = (await world.admin.users.CreateUser(request)).user

    assert set(user.roles) == {"service", "user"}


async def test_service_may_create_a_plain_user(world: World) -> None:
    user = (await world.service.users.CreateUser(create_request(world.recorder))).user

    assert list(user.roles) == ["user"]


async def test_service_creating_an_admin_is_permission_denied(world: World) -> None:
    request = create_request(world.recorder, roles=["admin"])

    await expect_denied(world.service.users.CreateUser(request))


async def test_service_granting_the_service_role_is_permission_denied(world: World) -> None:
    request = create_request(world.recorder, roles=["service"])

    await expect_denied(world.service.users.CreateUser(request))


async def test_unknown_role_is_invalid_argument_naming_roles(world: World) -> None:
    request = create_request(world.recorder, roles=["superuser"])

    failure = await expect_invalid(world.admin.users.CreateUser(request))

    assert all(name.startswith("roles") for name in failure.violation_fields)


async def test_malformed_email_is_invalid_argument_naming_email(world: World) -> None:
    request = create_request(world.recorder, email="not-an-email")

    await expect_invalid(world.anonymous.users.CreateUser(request), "email")


async def test_empty_email_is_invalid_argument_naming_email(world: World) -> None:
    request = create_request(world.recorder, email="")

    await expect_invalid(world.anonymous.users.CreateUser(request), "email")


async def test_email_over_254_characters_is_invalid_argument(world: World) -> None:
    email = "a" * 64 + "@" + ".".join(["b" * 60] * 3) + ".example.com"
    assert len(email) > 254

    await expect_invalid(
        world.anonymous.users.CreateUser(create_request(world.recorder, email=email)), "email"
    )


async def test_display_name_over_200_characters_is_invalid_argument(world: World) -> None:
    request = create_request(world.recorder, display_name="x" * 201)

    await expect_invalid(world.anonymous.users.CreateUser(request), "display_name")


async def test_display_name_with_control_characters_is_invalid_argument(world: World) -> None:
    request = create_request(world.recorder, display_name="bell\x07name")

    await expect_invalid(world.anonymous.users.CreateUser(request), "display_name")


async def test_label_key_outside_the_allowed_syntax_is_invalid_argument(world: World) -> None:
    request = create_request(world.recorder, labels={"Bad Key": "x"})

    failure = await expect_invalid(world.anonymous.users.CreateUser(request))

    assert all(name.startswith("labels") for name in failure.violation_fields)


async def test_every_invalid_field_gets_its_own_violation(world: World) -> None:
    request = create_request(world.recorder, email="nope", display_name="y" * 201)

    await expect_invalid(world.anonymous.users.CreateUser(request), "email", "display_name")


async def test_request_id_over_128_characters_is_invalid_argument(world: World) -> None:
    request = create_request(world.recorder, request_id="r" * 129)

    await expect_invalid(world.anonymous.users.CreateUser(request), "request_id")


async def test_password_shorter_than_8_characters_is_weak(world: World) -> None:
    await expect_weak_password(world, "Xq7!zr2")


async def test_empty_password_is_weak(world: World) -> None:
    await expect_weak_password(world, "")


async def test_password_over_72_ascii_bytes_is_weak(world: World) -> None:
    await expect_weak_password(world, "Zx9!" * 18 + "q")


async def test_password_of_37_two_byte_characters_is_weak_because_it_is_74_bytes(
    world: World,
) -> None:
    password = "é" * 37
    assert len(password) < 72 < len(password.encode())

    await expect_weak_password(world, password)


async def test_common_password_is_weak(world: World) -> None:
    await expect_weak_password(world, "password")


async def test_common_numeric_password_is_weak(world: World) -> None:
    await expect_weak_password(world, "12345678")


async def test_password_of_exactly_72_multibyte_bytes_is_accepted_and_logs_in(
    world: World,
) -> None:
    password = "ñ€" * 14 + "ab"
    assert len(password.encode()) == 72
    world.recorder.secrets.add(password)
    request = create_request(world.recorder, password=password)

    user = (await world.anonymous.users.CreateUser(request)).user
    login = await world.login(request.email, password)

    assert login.user.id == user.id


async def test_create_response_is_the_user_get_returns(world: World) -> None:
    created = (await world.admin.users.CreateUser(create_request(world.recorder))).user

    fetched = await world.get_as_admin(created.id)

    assert fetched == created


async def test_a_plain_user_may_create_another_user_while_sign_up_is_open(world: World) -> None:
    user = (await world.alice.users.CreateUser(create_request(world.recorder))).user

    assert list(user.roles) == ["user"]


async def test_concurrent_sign_ups_with_one_email_create_exactly_one_user(world: World) -> None:
    email = new_email("race")
    calls = [
        world.anonymous.users.CreateUser(create_request(world.recorder, email=email))
        for _ in range(6)
    ]

    outcomes = await asyncio.gather(*calls, return_exceptions=True)

    winners = [o for o in outcomes if not isinstance(o, BaseException)]
    losers = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(winners) == 1
    assert len(losers) == 5
    for loser in losers:
        assert_rich_error(
            decode_failure(loser), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_ALREADY_EXISTS"
        )


async def test_label_value_over_256_characters_is_invalid_argument_on_create(
    world: World,
) -> None:
    request = create_request(world.recorder, labels={"team": "v" * 257})

    failure = await expect_invalid(world.anonymous.users.CreateUser(request))

    assert all(name.startswith("labels") for name in failure.violation_fields)


async def test_more_than_64_labels_is_invalid_argument_on_create(world: World) -> None:
    request = create_request(world.recorder, labels={f"k{i}": "v" for i in range(65)})

    failure = await expect_invalid(world.anonymous.users.CreateUser(request))

    assert all(name.startswith("labels") for name in failure.violation_fields)


async def test_non_ascii_email_is_unique_and_found_regardless_of_case(world: World) -> None:
    created = (
        await world.admin.users.CreateUser(
            create_request(world.recorder, email="ÉMILE@example.com")
        )
    ).user

    found = (
        await world.admin.users.LookupUser(
            user_service_pb2.LookupUserRequest(email="Émile@EXAMPLE.com")
        )
    ).user
    await expect_error(
        world.admin.users.CreateUser(create_request(world.recorder, email="émile@example.com")),
        grpc.StatusCode.ALREADY_EXISTS,
        "EMAIL_ALREADY_EXISTS",
    )

    assert created.email == "émile@example.com"
    assert found.id == created.id


async def test_repeated_roles_are_stored_once(world: World) -> None:
    request = create_request(world.recorder, roles=["user", "admin", "user"])

    user = (await world.admin.users.CreateUser(request)).user

    assert sorted(user.roles) == ["admin", "user"]
