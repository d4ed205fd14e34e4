"""The one table from domain errors to gRPC statuses (docs/api.md, "Errors")."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2

from usersvc.api.errors import (
    ERROR_DOMAIN,
    internal_status,
    status_code_for,
    status_for_code,
    to_rpc_status,
    undecodable_request_status,
)
from usersvc.domain import errors

from .support import only_error_info, rich_status_from_metadata, unpack_details

CASES = [
    (
        errors.InvalidArgument.single("email", "bad"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    ),
    (
        errors.WeakPassword([errors.FieldViolation("password", "too short")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "WEAK_PASSWORD",
    ),
    (errors.UserNotFound(), grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND"),
    (errors.EmailAlreadyExists(), grpc.StatusCode.ALREADY_EXISTS, "EMAIL_ALREADY_EXISTS"),
    (errors.EtagMismatch(), grpc.StatusCode.ABORTED, "ETAG_MISMATCH"),
    (errors.InvalidState(), grpc.StatusCode.FAILED_PRECONDITION, "INVALID_STATE"),
    (errors.InvalidState(already_exists=True), grpc.StatusCode.ALREADY_EXISTS, "INVALID_STATE"),
    (errors.TokenInvalid(), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID"),
    (errors.TokenExpired(), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED"),
    (errors.TokenRevoked(), grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED"),
    (errors.InvalidCredentials(), grpc.StatusCode.UNAUTHENTICATED, "INVALID_CREDENTIALS"),
    (errors.RefreshTokenInvalid(), grpc.StatusCode.UNAUTHENTICATED, "REFRESH_TOKEN_INVALID"),
    (errors.PermissionDenied(), grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED"),
    (errors.RateLimited(1.5), grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED"),
    (errors.DatabaseUnavailable(), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE"),
]
IDS = [f"{type(e).__name__}-{code.name}" for e, code, _ in CASES]


def _all_subclasses(klass: type) -> list[type]:
    found = []
    for sub in klass.__subclasses__():
        found.append(sub)
        found.extend(_all_subclasses(sub))
    return found


@pytest.mark.parametrize(("error", "code", "reason"), CASES, ids=IDS)
def test_each_domain_error_gets_its_status_code(
    error: errors.DomainError, code: grpc.StatusCode, reason: str
) -> None:
    assert to_rpc_status(error).code is code


@pytest.mark.parametrize(("error", "code", "reason"), CASES, ids=IDS)
def test_each_domain_error_carries_exactly_one_error_info_with_its_reason(
    error: errors.DomainError, code: grpc.StatusCode, reason: str
) -> None:
    info = only_error_info(rich_status_from_metadata(to_rpc_status(error).trailing_metadata))
    assert (info.domain, info.reason) == (ERROR_DOMAIN, reason)


@pytest.mark.parametrize(("error", "code", "reason"), CASES, ids=IDS)
def test_the_rich_status_repeats_the_code_and_the_message(
    error: errors.DomainError, code: grpc.StatusCode, reason: str
) -> None:
    status = to_rpc_status(error)
    rich = rich_status_from_metadata(status.trailing_metadata)
    assert (rich.code, rich.message, status.details) == (
        code.value[0],
        error.message,
        error.message,
    )


def test_every_domain_error_class_has_a_row_in_the_table() -> None:
    unmapped = [
        klass.__name__
        for klass in _all_subclasses(errors.DomainError)
        if klass.__module__ == errors.__name__
        and status_code_for(_instance_of(klass)) is grpc.StatusCode.INTERNAL
    ]
    assert unmapped == []


def _instance_of(klass: type) -> errors.DomainError:
    if issubclass(klass, errors.InvalidArgument):
        return klass([])  # type: ignore[no-any-return]
    if issubclass(klass, errors.RateLimited):
        return klass(1.0)  # type: ignore[no-any-return]
    return klass()  # type: ignore[no-any-return]


def test_invalid_argument_carries_one_field_violation_per_bad_field() -> None:
    error = errors.InvalidArgument(
        [
            errors.FieldViolation("email", "not an email"),
            errors.FieldViolation("roles[0]", "unknown"),
        ]
    )
    bad_request = unpack_details(rich_status_from_metadata(to_rpc_status(error).trailing_metadata))[
        "BadRequest"
    ]
    assert [(v.field, v.description) for v in bad_request[0].field_violations] == [  # type: ignore[attr-defined]
        ("email", "not an email"),
        ("roles[0]", "unknown"),
    ]


def test_weak_password_carries_its_field_violation_too() -> None:
    error = errors.WeakPassword([errors.FieldViolation("new_password", "too common")])
    details = unpack_details(rich_status_from_metadata(to_rpc_status(error).trailing_metadata))
    assert [v.field for v in details["BadRequest"][0].field_violations] == ["new_password"]  # type: ignore[attr-defined]


def test_statuses_other_than_invalid_argument_carry_no_bad_request() -> None:
    details = unpack_details(
        rich_status_from_metadata(to_rpc_status(errors.UserNotFound()).trailing_metadata)
    )
    assert set(details) == {"ErrorInfo"}


def test_rate_limited_carries_retry_info_with_the_delay() -> None:
    details = unpack_details(
        rich_status_from_metadata(to_rpc_status(errors.RateLimited(2.25)).trailing_metadata)
    )
    retry = details["RetryInfo"][0]
    assert isinstance(retry, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 2_250_000_000


def test_error_metadata_reaches_the_error_info() -> None:
    error = errors.EmailAlreadyExists(metadata={"email": "ada@example.com"})
    info = only_error_info(rich_status_from_metadata(to_rpc_status(error).trailing_metadata))
    assert dict(info.metadata) == {"email": "ada@example.com"}


def test_internal_status_is_generic() -> None:
    status = internal_status()
    info = only_error_info(rich_status_from_metadata(status.trailing_metadata))
    assert (status.code, status.details, info.reason, info.domain) == (
        grpc.StatusCode.INTERNAL,
        "internal error",
        "INTERNAL",
        ERROR_DOMAIN,
    )


def test_a_domain_error_without_a_row_becomes_the_generic_internal_status() -> None:
    class Unmapped(errors.DomainError):
        reason = "SECRET_REASON"

    status = to_rpc_status(Unmapped("SELECT password_hash FROM users"))
    assert (status.code, status.details) == (grpc.StatusCode.INTERNAL, "internal error")


def test_undecodable_request_status_is_invalid_argument_naming_the_message() -> None:
    status = undecodable_request_status("usersvc.v1.GetUserRequest")
    details = unpack_details(rich_status_from_metadata(status.trailing_metadata))
    assert (status.code, status.details, details["ErrorInfo"][0].reason) == (  # type: ignore[attr-defined]
        grpc.StatusCode.INVALID_ARGUMENT,
        "request body is not a valid usersvc.v1.GetUserRequest",
        "INVALID_ARGUMENT",
    )


def test_undecodable_request_status_carries_a_bad_request() -> None:
    status = undecodable_request_status("usersvc.v1.GetUserRequest")
    details = unpack_details(rich_status_from_metadata(status.trailing_metadata))
    assert len(details["BadRequest"]) == 1


def test_a_code_chosen_by_a_handler_gets_an_error_info_named_after_it() -> None:
    status = status_for_code(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
    info = only_error_info(rich_status_from_metadata(status.trailing_metadata))
    assert (status.code, info.reason) == (grpc.StatusCode.UNIMPLEMENTED, "UNIMPLEMENTED")
