"""How large a response of users may grow: every response stays below the
4 MiB a default gRPC client accepts (its max_receive_message_length).

A user's size is over-estimated from the domain object, without the
generated code (services never import it): usersvc.domain.wire_size.
"""

from __future__ import annotations

from collections.abc import Iterable

from usersvc.domain.models import User
from usersvc.domain.wire_size import MAX_USER_WIRE_BYTES, user_wire_bytes

__all__ = [
    "MAX_RESPONSE_BYTES",
    "MAX_USERS_BYTES",
    "fitting_count",
    "fitting_prefix",
    "page_byte_budget",
    "user_wire_bytes",
]

# What a default grpc client accepts (grpc.max_receive_message_length).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# The users of one response; the rest is headroom for the response's other
# fields (a page token is at most 1 KiB) and gRPC framing.
MAX_USERS_BYTES = MAX_RESPONSE_BYTES - 64 * 1024


def fitting_prefix(users: Iterable[User], budget: int = MAX_USERS_BYTES) -> int:
    """How many of ``users``, from the first, fit in ``budget`` bytes (at
    least one when there is one: a single user is far below any budget
    this service uses). Raises nothing."""
    return fitting_count((user_wire_bytes(user) for user in users), budget)


def fitting_count(sizes: Iterable[int], budget: int = MAX_USERS_BYTES) -> int:
    """How many of ``sizes``, from the first, add up to at most ``budget``
    (at least one when there is one). Raises nothing."""
    used = 0
    count = 0
    for size in sizes:
        used += size
        if used > budget and count > 0:
            break
        count += 1
    return count


def page_byte_budget(page_size: int, budget: int = MAX_USERS_BYTES) -> int | None:
    """The bytes at which a page query of ``page_size`` users should stop
    reading (usersvc.domain.listing.ListQuery.max_bytes): ``budget``, or
    None when ``page_size`` + 1 users within the validation limits cannot
    pass it (up to 55 users: the default page of 50 is read as it always
    was, without summing sizes). Raises nothing."""
    if (page_size + 1) * MAX_USER_WIRE_BYTES <= budget:
        return None
    return budget
