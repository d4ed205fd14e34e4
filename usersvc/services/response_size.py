"""How large a response of users may grow: every response stays below the
4 MiB a default gRPC client accepts (its max_receive_message_length).

The size of a user on the wire is over-estimated here from the domain
object, without the generated code (services never import it): every
string counts its UTF-8 bytes plus a tag and a length prefix, and a fixed
allowance covers the id, etag, state, timestamps and the field's own
framing. tests/unit/api checks the estimate against the real encoded size.
"""

from __future__ import annotations

from collections.abc import Iterable

from usersvc.domain.models import User

# What a default grpc client accepts (grpc.max_receive_message_length).
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
# The users of one response; the rest is headroom for the response's other
# fields (a page token is at most 1 KiB) and gRPC framing.
MAX_USERS_BYTES = MAX_RESPONSE_BYTES - 64 * 1024
# id (36 characters), etag, state, up to three timestamps, the tags and
# length prefixes of those fields and of the user inside its response:
# well under this in practice (about 130 bytes).
_FIXED_USER_BYTES = 256
# A tag and a length prefix of up to three bytes (strings below 2 MiB).
_STRING_OVERHEAD = 4
# A map entry: its own tag and length, then key and value as strings.
_LABEL_OVERHEAD = 4 + 2 * _STRING_OVERHEAD


def _text(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass")) + _STRING_OVERHEAD


def user_wire_bytes(user: User) -> int:
    """An upper bound of ``user``'s encoded size inside a response. Raises
    nothing."""
    size = _FIXED_USER_BYTES + _text(user.email) + _text(user.display_name)
    size += sum(_text(role) for role in user.roles)
    size += sum(
        _LABEL_OVERHEAD + _text(key) + _text(value) - 2 * _STRING_OVERHEAD
        for key, value in user.labels.items()
    )
    return size


def fitting_prefix(users: Iterable[User], budget: int = MAX_USERS_BYTES) -> int:
    """How many of ``users``, from the first, fit in ``budget`` bytes (at
    least one when there is one: a single user is far below any budget
    this service uses). Raises nothing."""
    used = 0
    count = 0
    for user in users:
        used += user_wire_bytes(user)
        if used > budget and count > 0:
            break
        count += 1
    return count
