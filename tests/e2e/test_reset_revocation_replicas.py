"""A password reset on one replica ends the user's sessions on every other
replica within a second, as ChangePassword does (two real ``usersvc serve``
processes on one database, as in test_revocation_replicas.py)."""

from __future__ import annotations

import time

from .helpers import Caller, World, auth_service_pb2, new_password, user_service_pb2
from .test_revocation_replicas import (  # noqa: F401 (fixtures used by name)
    REVOCATION_BOUND_SECONDS,
    ServerProcess,
    key_file,
    two_replicas,
    until_refused,
)


async def test_a_reset_on_one_replica_revokes_the_sessions_on_another_within_a_second(
    two_replicas: tuple[ServerProcess, ServerProcess],  # noqa: F811 (the imported fixture)
    world: World,
) -> None:
    a, b = two_replicas
    user_id, email, password = await world.seed_user()
    login = await Caller(a.channel, None).auth.Login(
        auth_service_pb2.LoginRequest(email=email, password=password)
    )
    on_b = Caller(b.channel, login.access_token)
    accepted = await on_b.users.GetUser(user_service_pb2.GetUserRequest(id=user_id))
    assert accepted.user.id == user_id
    issued = await Caller(a.channel, world.admin.login.access_token).users.CreatePasswordResetCode(
        user_service_pb2.CreatePasswordResetCodeRequest(email=email)
    )

    await Caller(a.channel, None).users.ResetPassword(
        user_service_pb2.ResetPasswordRequest(
            email=email, code=issued.code, new_password=new_password(world.recorder)
        )
    )
    delay, accepted_after = await until_refused(on_b, user_id, time.perf_counter())

    print(f"reset revocation on the other replica after {delay * 1000:.1f} ms")
    assert delay < REVOCATION_BOUND_SECONDS, (delay, accepted_after)
