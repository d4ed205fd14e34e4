"""Every RPC of the service, read from the generated descriptors (so an RPC
added to the proto is fuzzed without touching these tests), and one way to
call any of them with raw bytes and judge the answer.

Calls always travel as bytes (identity serializers): fuzzed messages are
serialized here, malformed bodies are sent as they are, and the response
bytes can be searched for password hashes without knowing their type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from e2e.helpers import BCRYPT_PREFIXES, DOMAIN, RpcFailure, decode_failure
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message

from usersvc_protos.v1 import auth_service_pb2, user_service_pb2

SERVICES = (
    user_service_pb2.DESCRIPTOR.services_by_name["UserService"],
    auth_service_pb2.DESCRIPTOR.services_by_name["AuthService"],
)

# No answer the service gives on its own may carry these codes: INTERNAL and
# UNKNOWN are bugs, the rest mean a call was lost, hung or not served.
FORBIDDEN_CODES = frozenset(
    {
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.DATA_LOSS,
    }
)

# grpc's default grpc.max_metadata_size on the client: larger trailers are
# refused (at random up to twice this, always beyond), and the caller gets
# RESOURCE_EXHAUSTED instead of the status the service meant.
CLIENT_METADATA_SOFT_LIMIT = 8192


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    method: MethodDescriptor

    @property
    def path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def input(self) -> Descriptor:
        return self.method.input_type

    @property
    def client_streaming(self) -> bool:
        """Requests arrive as a stream (a unary call is a stream of one, so
        call_raw serves these too). The handler reads the stream only after
        the caller was authenticated and authorized, so a caller refused
        never gets as far as having its messages decoded."""
        return bool(self.method.client_streaming)

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def __str__(self) -> str:
        return self.name


def all_rpcs() -> list[Rpc]:
    return [
        Rpc(service.full_name, method.name, method)
        for service in SERVICES
        for method in service.methods
    ]


RPCS = all_rpcs()


@dataclass(frozen=True)
class Outcome:
    """The answer to one call: OK with the response bytes, or a failure."""

    rpc: Rpc
    code: grpc.StatusCode
    response: bytes | None
    failure: RpcFailure | None

    @property
    def ok(self) -> bool:
        return self.code is grpc.StatusCode.OK

    @property
    def reason(self) -> str | None:
        if self.failure is None or len(self.failure.error_infos) != 1:
            return None
        return self.failure.error_infos[0].reason

    def describe(self) -> str:
        if self.failure is None:
            return f"{self.rpc.name}: OK"
        reasons = [info.reason for info in self.failure.error_infos]
        return f"{self.rpc.name}: {self.code.name} {reasons} {self.failure.details!r}"


async def call_raw(
    channel: grpc.aio.Channel,
    rpc: Rpc,
    body: bytes,
    *,
    metadata: Sequence[tuple[str, str]] = (),
    deadline_seconds: float = 30.0,
) -> Outcome:
    """Send ``body`` as the request of ``rpc``; never raises for a status."""
    multicallable = channel.unary_unary(rpc.path)  # identity serializers: bytes in, bytes out
    try:
        response = await multicallable(body, metadata=tuple(metadata), timeout=deadline_seconds)
    except grpc.aio.AioRpcError as exc:
        failure = decode_failure(exc)
        return Outcome(rpc, failure.code, None, failure)
    return Outcome(rpc, grpc.StatusCode.OK, response, None)


def well_formed_problems(outcome: Outcome) -> list[str]:
    """What is wrong with an answer whatever the request was: a forbidden
    code, an error without exactly one usersvc ErrorInfo (or, on
    INVALID_ARGUMENT, without one BadRequest naming a violation), or a
    password hash in the response. Empty when the answer is acceptable."""
    problems = []
    if outcome.code in FORBIDDEN_CODES:
        problems.append(f"forbidden code: {outcome.describe()}")
    if outcome.response is not None and any(p in outcome.response for p in BCRYPT_PREFIXES):
        problems.append(f"{outcome.rpc.name}: bcrypt hash in the response")
    failure = outcome.failure
    if failure is None:
        return problems
    trailers = sum(len(key) + len(value) for key, value in failure.trailing_metadata)
    if trailers > CLIENT_METADATA_SOFT_LIMIT:
        problems.append(
            f"{outcome.rpc.name}: error trailers of {trailers} bytes exceed the "
            f"{CLIENT_METADATA_SOFT_LIMIT} bytes gRPC clients accept by default "
            f"(the caller saw {outcome.code.name}, not the service's "
            f"{[info.reason for info in failure.error_infos]})"
        )
    if failure.status is None:
        problems.append(f"no google.rpc.Status: {outcome.describe()}")
    elif failure.status.code != failure.code.value[0]:
        problems.append(f"status code differs from the call's: {outcome.describe()}")
    if len(failure.error_infos) != 1 or failure.error_infos[0].domain != DOMAIN:
        problems.append(f"not exactly one {DOMAIN} ErrorInfo: {outcome.describe()}")
    if failure.code is grpc.StatusCode.INVALID_ARGUMENT and (
        len(failure.bad_requests) != 1 or not failure.bad_requests[0].field_violations
    ):
        problems.append(f"INVALID_ARGUMENT without one BadRequest: {outcome.describe()}")
    return problems
