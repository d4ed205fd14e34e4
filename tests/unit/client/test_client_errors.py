"""The client turns every status the server builds into the matching typed
exception. The statuses come from the server's own error table
(usersvc.api.errors), so the two cannot drift apart unnoticed."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from usersvc.api import errors as server_errors
from usersvc.client import errors as client
from usersvc.domain import errors as domain


def rpc_error(
    status: grpc.Status, *, request_id: str | None = "req-1", details: str | None = None
) -> grpc.aio.AioRpcError:
    """What grpc.aio raises in a client for ``status``, as the server sends it
    (no headers; request id and rich status in the trailers)."""
    echo = (("x-request-id", request_id),) if request_id else ()
    return grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(*echo, *status.trailing_metadata),
        details if details is not None else status.details,
        None,
    )


def decoded(error: domain.DomainError) -> client.UsersvcError:
    return client.error_from_rpc(rpc_error(server_errors.to_rpc_status(error)))


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (domain.UserNotFound("no such user"), client.UserNotFound),
        (domain.EmailAlreadyExists("taken"), client.EmailAlreadyExists),
        (domain.EtagMismatch("stale"), client.EtagMismatch),
        (domain.InvalidState("deleted"), client.InvalidState),
        (domain.PermissionDenied("no"), client.PermissionDenied),
        (domain.DatabaseUnavailable("down"), client.DatabaseUnavailable),
        (domain.TokenInvalid("bad token"), client.TokenInvalid),
        (domain.TokenExpired("old token"), client.TokenExpired),
        (domain.TokenRevoked("ended"), client.TokenRevoked),
        (domain.InvalidCredentials("wrong"), client.InvalidCredentials),
        (domain.RefreshTokenInvalid("reused"), client.RefreshTokenInvalid),
        (domain.DeadlineExceeded("too late"), client.DeadlineExceeded),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.__name__,
)
def test_each_reason_the_server_sends_becomes_its_own_exception(
    error: domain.DomainError, expected: type[client.UsersvcError]
) -> None:
    exc = decoded(error)
    assert type(exc) is expected
    assert exc.reason == error.reason
    assert exc.code == server_errors.status_code_for(error)
    assert exc.message == error.message
    assert exc.request_id == "req-1"


def test_every_reason_in_the_server_table_has_a_class_of_its_own() -> None:
    reasons = {klass.reason for klass in server_errors.STATUS_CODES}
    reasons.add(server_errors.INTERNAL_REASON)
    unknown = sorted(r for r in reasons if r not in client._BY_REASON)
    assert unknown == []


def test_invalid_argument_carries_its_field_violations() -> None:
    exc = decoded(
        domain.InvalidArgument(
            [
                domain.FieldViolation("email", "not an email address"),
                domain.FieldViolation("password", "too common"),
            ],
            "invalid request",
        )
    )
    assert isinstance(exc, client.InvalidArgument)
    assert exc.field_violations == (
        client.FieldViolation("email", "not an email address"),
        client.FieldViolation("password", "too common"),
    )
    assert "email: not an email address" in str(exc)


def test_a_weak_password_is_also_an_invalid_argument() -> None:
    exc = decoded(domain.WeakPassword([domain.FieldViolation("password", "too short")], "weak"))
    assert isinstance(exc, client.WeakPassword)
    assert isinstance(exc, client.InvalidArgument)
    assert [v.field for v in exc.field_violations] == ["password"]


def test_rate_limited_says_when_to_come_back() -> None:
    exc = decoded(domain.RateLimited(1.5, "slow down"))
    assert isinstance(exc, client.RateLimited)
    assert isinstance(exc, client.ResourceExhausted)
    assert exc.retry_after == pytest.approx(1.5)


def test_undeleting_a_live_user_is_invalid_state_with_already_exists() -> None:
    exc = decoded(domain.InvalidState("live", already_exists=True))
    assert isinstance(exc, client.InvalidState)
    assert exc.code == grpc.StatusCode.ALREADY_EXISTS


def test_an_unexpected_server_error_is_internal() -> None:
    exc = client.error_from_rpc(rpc_error(server_errors.internal_status()))
    assert isinstance(exc, client.Internal)
    assert exc.reason == "INTERNAL"


def test_an_unknown_reason_falls_back_to_the_class_of_its_code_and_keeps_the_reason() -> None:
    status = server_errors.status_for_code(grpc.StatusCode.UNAVAILABLE, "draining")
    exc = client.error_from_rpc(rpc_error(status))
    assert type(exc) is client.Unavailable
    assert exc.reason == "UNAVAILABLE"

    status = server_errors.status_for_code(grpc.StatusCode.OUT_OF_RANGE, "odd")
    exc = client.error_from_rpc(rpc_error(status))
    assert type(exc) is client.UsersvcError
    assert exc.code == grpc.StatusCode.OUT_OF_RANGE


def test_an_error_without_details_gets_the_class_of_its_code() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(),
        "Deadline",
        None,
    )
    exc = client.error_from_rpc(error)
    assert type(exc) is client.DeadlineExceeded
    assert exc.reason is None
    assert exc.request_id is None
    assert exc.field_violations == ()


def test_the_request_id_of_an_older_server_is_read_from_the_headers() -> None:
    # Servers from before the trailer echo sent it in the response headers.
    status = server_errors.to_rpc_status(domain.UserNotFound("no such user"))
    error = grpc.aio.AioRpcError(
        status.code,
        grpc.aio.Metadata(("x-request-id", "old-1")),
        grpc.aio.Metadata(*status.trailing_metadata),
        status.details,
        None,
    )
    assert client.error_from_rpc(error).request_id == "old-1"


def test_a_garbled_details_trailer_still_gives_the_error_of_the_code() -> None:
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", b"\xff\xfe not a status")),
        "not found",
        None,
    )
    exc = client.error_from_rpc(error)
    assert type(exc) is client.UsersvcError
    assert exc.code == grpc.StatusCode.NOT_FOUND


def test_error_info_of_another_domain_is_not_taken_for_ours() -> None:
    foreign = server_errors.to_rpc_status(domain.UserNotFound("x"))
    raw = dict(foreign.trailing_metadata)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    info.domain = "someone.else"
    status.details[0].Pack(info)
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        "not found",
        None,
    )
    exc = client.error_from_rpc(error)
    assert exc.reason is None
    assert type(exc) is client.UsersvcError
