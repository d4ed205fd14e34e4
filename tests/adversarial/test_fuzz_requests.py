"""Property: whatever request message any caller sends to any RPC, the
answer is well formed (never INTERNAL or UNKNOWN; errors carry exactly one
usersvc ErrorInfo), no caller gets more than its role allows, the server
stays up, and the database stays consistent.

Requests are generated from the message descriptors (tests/adversarial/
strategies.py), so every field of every RPC is covered, new ones included.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine

from usersvc_protos.v1 import user_service_pb2

from .rpcs import RPCS, Outcome, Rpc, call_raw, well_formed_problems
from .strategies import message_strategy
from .support import (
    Bridge,
    Cast,
    assert_consistent,
    assert_serving,
    count,
    fuzz_settings,
    run_property,
)

CALLERS = ("anonymous", "user", "admin")
# Room left under the server's message limit for the frame around the body:
# the property is about what the service does with a message it accepts.
SIZE_MARGIN = 4096
# Methods anyone may call, so a garbage token need not decide them.
PUBLIC_RPCS = frozenset({"Login", "GetJwks", "RefreshToken", "CreateUser"})
# Methods only admins and services may call (docs/api.md): a plain user never
# succeeds with them, whatever it sends.
PRIVILEGED_RPCS = frozenset(
    {
        "LookupUser",
        "ListUsers",
        "BatchGetUsers",
        "BatchCreateUsers",
        "UndeleteUser",
        "PurgeUser",
        "DisableUser",
        "EnableUser",
        "IntrospectToken",
        "ImportUsers",
    }
)


def privilege_problems(caller: str, outcome: Outcome) -> list[str]:
    """An answer that gives ``caller`` more than its role allows: any
    success of a non-public method without credentials, a privileged
    method's success for a plain user, or a user that gains a role beyond
    "user" through a caller that is not an admin."""
    if not outcome.ok or caller == "admin" or outcome.response is None:
        return []
    name = outcome.rpc.name
    if caller == "anonymous" and name not in PUBLIC_RPCS:
        return [f"anonymous caller succeeded with {name}"]
    if caller == "user" and name in PRIVILEGED_RPCS:
        return [f"plain user succeeded with {name}"]
    response_types = {
        "CreateUser": user_service_pb2.CreateUserResponse,
        "UpdateUser": user_service_pb2.UpdateUserResponse,
    }
    if name in response_types:
        user = response_types[name].FromString(outcome.response).user
        if set(user.roles) != {"user"}:
            return [f"{caller} caller made a user with roles {list(user.roles)} via {name}"]
    return []


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_any_request_gets_a_well_formed_answer_and_leaves_the_database_consistent(
    rpc: Rpc, caller: str, cast: Cast, engine: AsyncEngine
) -> None:
    strategy = message_strategy(rpc.input, cast.pools)
    limit = cast.server.max_message_bytes - SIZE_MARGIN

    def prop(bridge: Bridge) -> None:
        @fuzz_settings()
        @given(request=strategy)
        def well_formed(request: object) -> None:
            body = request.SerializeToString()  # type: ignore[attr-defined]
            assume(len(body) <= limit)
            outcome = bridge.run(call_raw(cast.channel, rpc, body, metadata=cast.metadata(caller)))
            count("fuzzed request messages", outcome)
            problems = well_formed_problems(outcome) + privilege_problems(caller, outcome)
            assert not problems, problems
            bridge.run(cast.after(outcome))

        well_formed()

    await run_property(prop)

    await assert_serving(cast.channel)
    await assert_consistent(engine)


@pytest.mark.parametrize("rpc", RPCS, ids=str)
async def test_any_authorization_header_is_refused_cleanly_or_accepted(
    rpc: Rpc, cast: Cast
) -> None:
    """Garbage where the bearer token goes: UNAUTHENTICATED with a usersvc
    ErrorInfo (or, for a public method that ignores it, an ordinary
    answer), never a crash of the auth interceptor."""
    header_values = st.one_of(
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60),
        st.builds(
            lambda t: "Bearer " + t,
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=300),
        ),
        st.sampled_from(("Bearer", "Bearer ", "bearer  x", "Basic dXNlcjpwYXNz", "Bearer a.b.c")),
        st.builds(
            lambda t, cut: "Bearer " + t[:cut],
            st.just(cast.admin.login.access_token),
            st.integers(0, 300),
        ),
    )
    body = rpc.request_class()().SerializeToString()

    def prop(bridge: Bridge) -> None:
        @fuzz_settings(max_examples=10)
        @given(value=header_values)
        def refused_cleanly(value: str) -> None:
            outcome = bridge.run(
                call_raw(cast.channel, rpc, body, metadata=(("authorization", value),))
            )
            count("fuzzed authorization headers", outcome)
            problems = well_formed_problems(outcome)
            assert not problems, problems
            assert outcome.code is not grpc.StatusCode.OK or rpc.name in PUBLIC_RPCS, (
                outcome.describe()
            )

        refused_cleanly()

    await run_property(prop)

    await assert_serving(cast.channel)
