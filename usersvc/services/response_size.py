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
    "byte_budget",
    "fitting_count",
    "fitting_prefix",
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


def byte_budget(count: int, budget: int = MAX_USERS_BYTES) -> int | None:
    """The bytes at which a read of up to ``count`` users should stop or
    refuse (usersvc.domain.listing.ListQuery.max_bytes,
    usersvc.domain.ports.UserReader.get_many_within): ``budget``, or None
    when ``count`` users within the validation limits cannot pass it (up
    to 56: the default page of 50 and its one more, and batches of up to
    56 ids, are read as they always were, without summing sizes). Raises
    nothing."""
    if count * MAX_USER_WIRE_BYTES <= budget:
        return None
    return budget
