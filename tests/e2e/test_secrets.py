"""No response ever carries a password or a password hash.

Every test of the tier is already checked by the autouse fixture
``no_secret_in_any_response``; the tests here drive every RPC that returns a
user once, in one place, and prove the detector itself works."""

from __future__ import annotations

import bcrypt
from google.protobuf import field_mask_pb2

from .helpers import (
    RecordedResponse,
    ResponseRecorder,
    World,
    auth_service_pb2,
    create_request,
    new_password,
    user_pb2,
    user_service_pb2,
)


async def test_no_response_of_any_rpc_carries_a_password_or_hash(world: World) -> None:
    users, recorder = world.admin.users, world.recorder
    mark = len(recorder.responses)
    created = (await world.anonymous.users.CreateUser(create_request(recorder))).user
    await users.GetUser(user_service_pb2.GetUserRequest(id=created.id))
    await users.LookupUser(user_service_pb2.LookupUserRequest(email=created.email))
    await users.ListUsers(user_service_pb2.ListUsersRequest(page_size=1000))
    await users.UpdateUser(
        user_service_pb2.UpdateUserRequest(
            user=user_pb2.User(id=created.id, display_name="Quiet"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    await users.ChangePassword(
        user_service_pb2.ChangePasswordRequest(id=created.id, new_password=new_password(recorder))
    )
    await users.DisableUser(user_service_pb2.DisableUserRequest(id=created.id))
    await users.EnableUser(user_service_pb2.EnableUserRequest(id=created.id))
    await users.DeleteUser(user_service_pb2.DeleteUserRequest(id=created.id))
    await users.UndeleteUser(user_service_pb2.UndeleteUserRequest(id=created.id))
    batch = (
        await users.BatchCreateUsers(
            user_service_pb2.BatchCreateUsersRequest(
                requests=[create_request(recorder) for _ in range(3)]
            )
        )
    ).users
    await users.BatchGetUsers(user_service_pb2.BatchGetUsersRequest(ids=[u.id for u in batch]))
    await world.anonymous.auth.Login(
        auth_service_pb2.LoginRequest(email=world.bob.email, password=world.bob.password)
    )
    await world.anonymous.auth.GetJwks(auth_service_pb2.GetJwksRequest())
    await users.PurgeUser(user_service_pb2.PurgeUserRequest(id=created.id))

    assert len(recorder.responses) - mark == 15
    assert recorder.leaks(since=mark) == []


def test_the_leak_detector_finds_a_bcrypt_hash() -> None:
    recorder = ResponseRecorder()
    digest = bcrypt.hashpw(b"whatever-secret", bcrypt.gensalt(rounds=4))
    recorder.responses.append(RecordedResponse("/x/Y", b"prefix" + digest))

    assert recorder.leaks() == ["/x/Y: bcrypt hash"]


def test_the_leak_detector_finds_a_password_the_suite_used() -> None:
    recorder = ResponseRecorder()
    password = new_password(recorder)
    recorder.responses.append(RecordedResponse("/x/Y", password.encode()))

    assert recorder.leaks() == [f"/x/Y: password {password!r}"]


def test_the_leak_detector_finds_every_password_wherever_it_sits_in_a_large_response() -> None:
    recorder = ResponseRecorder()
    # Long and short ones (the short ones are not indexed), one multibyte.
    passwords = [new_password(recorder) for _ in range(3)] + ["short-pw", "ñ€" * 14 + "ab"]
    recorder.secrets.update(passwords)
    filler = bytes(range(256)) * 4096
    for password in passwords:
        for offset in range(9):
            payload = filler[: len(filler) - 100 + offset] + password.encode() + filler[:offset]
            recorder.responses.append(RecordedResponse(f"/x/{offset}", payload))

    found = recorder.leaks()

    assert found == [
        f"/x/{offset}: password {password!r}" for password in passwords for offset in range(9)
    ]


def test_the_leak_detector_finds_passwords_added_after_an_earlier_search() -> None:
    recorder = ResponseRecorder()
    first = new_password(recorder)
    recorder.responses.append(RecordedResponse("/x/Y", b"clean"))
    assert recorder.leaks() == []
    second = new_password(recorder)
    recorder.responses.append(RecordedResponse("/x/Z", f"{first} and {second}".encode()))

    assert recorder.leaks(since=1) == sorted(
        [f"/x/Z: password {first!r}", f"/x/Z: password {second!r}"]
    )
