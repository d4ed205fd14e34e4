"""The unary calls the load replays, and how to tell a right answer.

A Call is the exact bytes h2load will send (the serialized request), the
headers, and a check of the decoded response. ``verify`` sends those very
bytes through a real gRPC client, so a call that h2load would count as a
success (HTTP 200) but that fails in gRPC terms, or answers with the wrong
user, stops the run before it is measured.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import Message

from .h2load import grpc_frame

USER_SERVICE = "/usersvc.v1.UserService/"
AUTH_SERVICE = "/usersvc.v1.AuthService/"

Check = Callable[[Any], str | None]


class CallCheckFailed(AssertionError):
    """A system answered a benchmark call wrongly."""


@dataclass(frozen=True)
class Call:
    """One unary call: ``path`` such as /usersvc.v1.UserService/GetUser."""

    path: str
    request: Message
    response_type: type[Message]
    check: Check
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def body(self) -> bytes:
        return grpc_frame(self.request.SerializeToString())

    def h2load_headers(self) -> list[str]:
        return [f"{name}: {value}" for name, value in self.headers]

    def write_body(self, path: Path) -> Path:
        """Write the framed request for h2load's --data. Raises OSError."""
        path.write_bytes(self.body)
        return path


@dataclass(frozen=True)
class HttpCall:
    """One HTTP/1.1 GET of ``path`` with ``headers``, answered with JSON that
    ``check`` judges: the load of the FastAPI comparison. Shaped like Call
    for the runner (no body: h2load sends a GET)."""

    path: str
    check: Check
    headers: tuple[tuple[str, str], ...] = ()
    h1: bool = True

    def h2load_headers(self) -> list[str]:
        return [f"{name}: {value}" for name, value in self.headers]


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def invoke(address: str, call: Call, *, seconds: float = 30.0) -> Any:
    """Send ``call``'s serialized request to ``address`` and decode the
    answer. Raises grpc.aio.AioRpcError on a non-OK status."""
    async with grpc.aio.insecure_channel(address) as channel:
        method = channel.unary_unary(
            call.path,
            request_serializer=lambda body: body,
            response_deserializer=call.response_type.FromString,
        )
        return await method(
            call.request.SerializeToString(), metadata=call.headers, timeout=seconds
        )


async def verify(address: str, system: str, label: str, call: Call) -> None:
    """Raises CallCheckFailed unless ``call`` answers OK and passes its check."""
    try:
        response = await invoke(address, call)
    except grpc.aio.AioRpcError as exc:
        raise CallCheckFailed(f"{label} on {system}: {exc.code().name}: {exc.details()}") from None
    problem = call.check(response)
    if problem is not None:
        raise CallCheckFailed(f"{label} on {system}: {problem}")


async def verify_http(address: str, system: str, label: str, call: HttpCall) -> None:
    """Raises CallCheckFailed unless ``call`` answers 200 with JSON that
    passes its check."""

    def get() -> Any:
        request = urllib.request.Request(f"http://{address}{call.path}", headers=dict(call.headers))
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - http://127.0.0.1
            return json.loads(response.read())

    try:
        answer = await asyncio.to_thread(get)
    except (OSError, ValueError) as exc:
        raise CallCheckFailed(f"{label} on {system}: {exc}") from None
    problem = call.check(answer)
    if problem is not None:
        raise CallCheckFailed(f"{label} on {system}: {problem}")


async def verify_all(checks: Sequence[tuple[str, str, str, Call]]) -> None:
    """``verify`` each (address, system, label, call), one after another (a
    login costs a bcrypt-12 verification). Raises CallCheckFailed."""
    for address, system, label, call in checks:
        await verify(address, system, label, call)


def expect_user(*, id: str | None = None, email: str | None = None) -> Check:
    """The response's ``user`` has this id and/or email."""

    def check(response: Any) -> str | None:
        user = response.user
        if id is not None and user.id != id:
            return f"user.id {user.id!r}, expected {id!r}"
        if email is not None and user.email != email:
            return f"user.email {user.email!r}, expected {email!r}"
        return None

    return check


def expect_display_name(id: str, display_name: str) -> Check:
    def check(response: Any) -> str | None:
        problem = expect_user(id=id)(response)
        if problem is None and response.user.display_name != display_name:
            return f"display_name {response.user.display_name!r}, expected {display_name!r}"
        return problem

    return check


EXACT_TOTAL_UP_TO = 10_000
TOTAL_ESTIMATE_TOLERANCE = 0.10


def total_size_problem(reported: int, actual: int) -> str | None:
    """docs/api.md's rule for a first page's total_size: exact up to 10,000
    matches, beyond that within 10%."""
    if actual <= EXACT_TOTAL_UP_TO:
        return None if reported == actual else f"total_size {reported}, expected {actual}"
    if abs(reported - actual) <= TOTAL_ESTIMATE_TOLERANCE * actual:
        return None
    return f"total_size {reported}, more than 10% off {actual}"


def expect_page(*, first_email: str, size: int, total: int, more: bool = True) -> Check:
    """A ListUsers page of ``size`` users starting at ``first_email``, a
    total_size that docs/api.md allows for ``total`` matches (exact up to 10,000,
    else within 10%), with a next page token when ``more``."""

    def check(response: Any) -> str | None:
        if len(response.users) != size:
            return f"{len(response.users)} users, expected {size}"
        if response.users[0].email != first_email:
            return f"first user {response.users[0].email!r}, expected {first_email!r}"
        problem = total_size_problem(response.total_size, total)
        if problem is not None:
            return problem
        if more and not response.next_page_token:
            return "no next_page_token"
        return None

    return check


def expect_token(response: Any) -> str | None:
    """A Login answer with an access token."""
    return None if response.access_token else "no access_token"
