"""A client built at run time from what the server publishes: descriptors
come over server reflection, messages are made from them with
google.protobuf's message factory, and calls go through plain grpc channel
methods. Nothing here is generated from, or imported from, usersvc.

Only public packages are used: grpcio, grpcio-reflection (its reflection
client), protobuf, googleapis-common-protos (google.rpc.Status and the error
detail messages, which the API names as part of its contract) and PyJWT."""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

USER_SERVICE = "usersvc.v1.UserService"
AUTH_SERVICE = "usersvc.v1.AuthService"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_SERVICE = "grpc.reflection.v1alpha.ServerReflection"
ERROR_DOMAIN = "usersvc.v1"
CALL_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True)
class Reply:
    message: Any
    initial_metadata: dict[str, str]
    trailing_metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Failure:
    """A failed call, with its google.rpc.Status details unpacked."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status | None
    initial_metadata: dict[str, str] = field(default_factory=dict)
    trailing_metadata: dict[str, str] = field(default_factory=dict)

    def error_infos(self) -> list[error_details_pb2.ErrorInfo]:
        return self._unpacked(error_details_pb2.ErrorInfo)

    def bad_requests(self) -> list[error_details_pb2.BadRequest]:
        return self._unpacked(error_details_pb2.BadRequest)

    def violated_fields(self) -> set[str]:
        return {
            violation.field
            for bad_request in self.bad_requests()
            for violation in bad_request.field_violations
        }

    @property
    def reason(self) -> str:
        infos = self.error_infos()
        assert len(infos) == 1, f"expected exactly one ErrorInfo, got {infos}"
        return str(infos[0].reason)

    def _unpacked(self, kind: type[Any]) -> list[Any]:
        if self.status is None:
            return []
        found = []
        for detail in self.status.details:
            if detail.Is(kind.DESCRIPTOR):
                item = kind()
                detail.Unpack(item)
                found.append(item)
        return found


class CallFailed(Exception):
    def __init__(self, failure: Failure):
        super().__init__(f"{failure.code.name}: {failure.message}")
        self.failure = failure


def _as_dict(pairs: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    result: dict[str, str] = {}
    for key, value in pairs or ():
        result[key] = value.decode(errors="replace") if isinstance(value, bytes) else value
    return result


class ReflectedApi:
    """Services, messages and calls of the server on ``channel``, as its
    reflection service describes them."""

    def __init__(self, channel: grpc.Channel):
        self.channel = channel
        self.database = ProtoReflectionDescriptorDatabase(channel)
        self.pool = descriptor_pool.DescriptorPool(self.database)

    def service_names(self) -> set[str]:
        return set(self.database.get_services())

    def service(self, name: str) -> ServiceDescriptor:
        return self.pool.FindServiceByName(name)

    def method(self, full_method: str) -> MethodDescriptor:
        service, _, method = full_method.rpartition(".")
        found = self.service(service).FindMethodByName(method)
        assert found is not None, f"{service} has no method {method}"
        return found

    def message(self, full_name: str, **fields: Any) -> Any:
        cls = message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))
        return cls(**fields)

    def request(self, full_method: str, **fields: Any) -> Any:
        descriptor = self.method(full_method).input_type
        return message_factory.GetMessageClass(descriptor)(**fields)

    def call(
        self,
        full_method: str,
        request: Message | None = None,
        *,
        token: str | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        **fields: Any,
    ) -> Reply:
        """Call a unary method ("usersvc.v1.UserService.GetUser"); ``fields``
        build the request when ``request`` is None. Raises CallFailed."""
        method = self.method(full_method)
        if request is None:
            request = self.request(full_method, **fields)
        response_class = message_factory.GetMessageClass(method.output_type)
        callable_ = self.channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=response_class.FromString,
        )
        headers = list(metadata)
        if token is not None:
            headers.append(("authorization", f"Bearer {token}"))
        try:
            response, call = callable_.with_call(
                request, metadata=tuple(headers), timeout=CALL_TIMEOUT_SECONDS
            )
        except grpc.RpcError as error:
            raise CallFailed(failure_of(error)) from None
        return Reply(
            response, _as_dict(call.initial_metadata()), _as_dict(call.trailing_metadata())
        )


def failure_of(error: grpc.RpcError) -> Failure:
    call: Any = error
    trailers = call.trailing_metadata() or ()
    status = None
    for key, value in trailers:
        if key == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
    return Failure(
        code=call.code(),
        message=call.details() or "",
        status=status,
        initial_metadata=_as_dict(call.initial_metadata()),
        trailing_metadata=_as_dict(trailers),
    )


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unverified_header(token: str) -> dict[str, Any]:
    header: dict[str, Any] = json.loads(b64url_decode(token.split(".")[0]))
    return header
