"""Error statuses stay small enough for grpc clients to read them: the
trailers carrying a status are refused above 16 KiB and, by default, at
random above 8 KiB (usersvc.api.errors)."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2

from usersvc.api.errors import (
    MAX_STATUS_MESSAGE_BYTES,
    OMITTED_VIOLATIONS_KEY,
    to_rpc_status,
)
from usersvc.domain import errors

SOFT_LIMIT_BYTES = 8 * 1024


def _trailer_bytes(error: errors.DomainError) -> int:
    status = to_rpc_status(error)
    message = status.details.encode()
    # grpc-message is percent-encoded: at worst three bytes per byte.
    return 3 * len(message) + sum(len(k) + len(v) for k, v in status.trailing_metadata)


def _decoded(error: errors.DomainError) -> tuple[status_pb2.Status, error_details_pb2.BadRequest]:
    status = status_pb2.Status.FromString(
        dict(to_rpc_status(error).trailing_metadata)["grpc-status-details-bin"]
    )
    bad_request = error_details_pb2.BadRequest()
    for detail in status.details:
        if detail.Is(bad_request.DESCRIPTOR):
            detail.Unpack(bad_request)
    return status, bad_request


def _violations(count: int) -> errors.InvalidArgument:
    return errors.InvalidArgument(
        [
            errors.FieldViolation(f"requests[{i}].email", "must contain exactly one '@'")
            for i in range(count)
        ]
    )


def test_six_thousand_violations_fit_under_the_clients_soft_limit() -> None:
    assert _trailer_bytes(_violations(6000)) < SOFT_LIMIT_BYTES


def test_the_violations_left_out_are_counted_in_the_error_info() -> None:
    status, bad_request = _decoded(_violations(6000))
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)

    shown = len(bad_request.field_violations)
    assert shown + int(info.metadata[OMITTED_VIOLATIONS_KEY]) == 6000
    assert bad_request.field_violations[0].field == "requests[0].email"


def test_a_few_violations_are_all_shown_without_a_count() -> None:
    status, bad_request = _decoded(_violations(3))
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)

    assert len(bad_request.field_violations) == 3
    assert OMITTED_VIOLATIONS_KEY not in info.metadata


def test_one_huge_violation_is_shown_cut_short() -> None:
    error = errors.InvalidArgument.single("filter", "é" * 100_000)

    _, bad_request = _decoded(error)

    description = bad_request.field_violations[0].description
    assert len(description.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert description.endswith("...")
    assert _trailer_bytes(error) < SOFT_LIMIT_BYTES


def test_a_long_message_is_cut_on_a_character_boundary() -> None:
    status = to_rpc_status(errors.PermissionDenied("ü" * 10_000))

    assert len(status.details.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert status.details.startswith("ü" * 10)
