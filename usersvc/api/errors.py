"""Domain errors -> gRPC statuses: the one table, and the rich statuses built
from it.

Every status built here carries a google.rpc.Status in the
``grpc-status-details-bin`` trailer with exactly one google.rpc.ErrorInfo
(domain "usersvc.v1"), plus google.rpc.BadRequest on INVALID_ARGUMENT and
google.rpc.RetryInfo on RESOURCE_EXHAUSTED (docs/api.md, "Errors"). Applied in one
place: ``usersvc.api.interceptors.ErrorMappingInterceptor``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from usersvc.domain import errors as domain

ERROR_DOMAIN = "usersvc.v1"
INTERNAL_MESSAGE = "internal error"
INTERNAL_REASON = "INTERNAL"

# A status travels in the trailers, which grpc clients refuse above 16 KiB
# and, by default, refuse at random above 8 KiB (grpc.max_metadata_size): the
# caller would see RESOURCE_EXHAUSTED "Stream removed" instead of the error.
# A batch of 1000 bad items makes thousands of violations, so the message and
# the violations are cut to these budgets (the message is sent twice, in
# grpc-message percent-encoded and inside the Status).
MAX_STATUS_MESSAGE_BYTES = 512
MAX_VIOLATIONS_BYTES = 3072
OMITTED_VIOLATIONS_KEY = "omitted_violations"

# The table. Lookup walks the error's class hierarchy, so a subclass without a
# row of its own (TokenExpired, RefreshTokenInvalid, ...) takes its parent's
# code. A class with no row anywhere above it becomes INTERNAL: adding a
# domain error means adding its row here.
STATUS_CODES: Mapping[type[domain.DomainError], grpc.StatusCode] = MappingProxyType(
    {
        domain.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
        domain.WeakPassword: grpc.StatusCode.INVALID_ARGUMENT,
        domain.CodeInvalid: grpc.StatusCode.INVALID_ARGUMENT,
        domain.UserNotFound: grpc.StatusCode.NOT_FOUND,
        domain.EmailAlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
        domain.EtagMismatch: grpc.StatusCode.ABORTED,
        # ALREADY_EXISTS instead when the error says so (undeleting a live
        # user): see status_code_for.
        domain.InvalidState: grpc.StatusCode.FAILED_PRECONDITION,
        domain.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
        domain.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
        domain.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
        domain.DatabaseUnavailable: grpc.StatusCode.UNAVAILABLE,
        domain.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def status_code_for(error: domain.DomainError) -> grpc.StatusCode:
    """The status code of ``error``; INTERNAL when the table has no row for it.
    Never raises."""
    if isinstance(error, domain.InvalidState) and error.already_exists:
        return grpc.StatusCode.ALREADY_EXISTS
    return _code_for_class(type(error))


def _code_for_class(error_class: type[domain.DomainError]) -> grpc.StatusCode:
    for klass in error_class.__mro__:
        code = STATUS_CODES.get(klass)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_rpc_status(error: domain.DomainError) -> grpc.Status:
    """The status a caller receives for ``error``: its code from the table,
    its message, and the detail messages the contract promises. An error
    without a row in the table gets ``internal_status()``. Never raises."""
    code = status_code_for(error)
    if code is grpc.StatusCode.INTERNAL:
        return internal_status()
    metadata = dict(error.metadata)
    bad_request = None
    if isinstance(error, domain.InvalidArgument):
        bad_request, omitted = _bounded_bad_request(error.violations)
        if omitted:
            metadata[OMITTED_VIOLATIONS_KEY] = str(omitted)
    details = [_error_info(error.reason, metadata)]
    if bad_request is not None:
        details.append(_pack(bad_request))
    if isinstance(error, domain.RateLimited):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(max(0, round(error.retry_after_seconds * 1e9)))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    return _status(code, _truncated(error.message), details)


def _bounded_bad_request(
    violations: tuple[domain.FieldViolation, ...],
) -> tuple[error_details_pb2.BadRequest, int]:
    """The violations that fit in MAX_VIOLATIONS_BYTES, in order (at least
    one), and how many were left out."""
    bad_request = error_details_pb2.BadRequest()
    used = 0
    for index, violation in enumerate(violations):
        item = error_details_pb2.BadRequest.FieldViolation(
            field=_truncated(violation.field), description=_truncated(violation.description)
        )
        # The field's own bytes plus its tag and length prefix.
        used += item.ByteSize() + 4
        if used > MAX_VIOLATIONS_BYTES and index > 0:
            return bad_request, len(violations) - index
        bad_request.field_violations.append(item)
    return bad_request, 0


def _truncated(text: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    # Cut on a character boundary, and say that it was cut.
    return encoded[: limit - 3].decode("utf-8", "ignore") + "..."


@functools.cache
def internal_status() -> grpc.Status:
    """INTERNAL for anything unexpected: a fixed message and reason, never a
    class name, SQL or traceback (those go to the log). Never raises."""
    return _status(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE, [_error_info(INTERNAL_REASON, {})])


@functools.cache
def undecodable_request_status(message_name: str) -> grpc.Status:
    """INVALID_ARGUMENT for a request body that is not a valid serialized
    ``message_name`` (instead of grpc's UNKNOWN "Unexpected DecodeError").
    The one field violation has an empty field path: the body as a whole is
    wrong. Never raises."""
    message = f"request body is not a valid {message_name}"
    return to_rpc_status(domain.InvalidArgument([domain.FieldViolation("", message)], message))


def status_for_code(code: grpc.StatusCode, message: str) -> grpc.Status:
    """A rich status for a code a handler chose itself (the generated base
    class answers UNIMPLEMENTED this way); its reason is the code's name.
    Never raises."""
    return _status(code, message, [_error_info(code.name, {})])


def _error_info(reason: str, metadata: Mapping[str, str]) -> any_pb2.Any:
    return _pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _status(code: grpc.StatusCode, message: str, details: list[any_pb2.Any]) -> grpc.Status:
    status: grpc.Status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=message, details=details)
    )
    return status
