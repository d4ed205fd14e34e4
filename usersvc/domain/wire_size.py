"""What a user costs inside a response, over-estimated from the domain
object: every string counts its UTF-8 bytes plus a tag and a length prefix,
and a fixed allowance covers the id, etag, state, timestamps and the
field's own framing.

The services cut responses with it (usersvc.services.response_size), and
PostgreSQL computes the same sum, or a few bytes more, never less
(usersvc.adapters.repository.sizes), so that a page stops where the service
would stop taking users and a batch too large is refused before its users
are read. tests/unit/api checks the estimate against the real encoded size,
tests/integration the SQL against this.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from usersvc.domain.models import KNOWN_ROLES, User
from usersvc.domain.validation import (
    MAX_DISPLAY_NAME_LENGTH,
    MAX_EMAIL_LENGTH,
    MAX_LABEL_KEY_LENGTH,
    MAX_LABEL_VALUE_LENGTH,
    MAX_LABELS,
    MAX_ROLES,
)

# id (36 characters), etag, state, up to three timestamps, the tags and
# length prefixes of those fields and of the user inside its response:
# well under this in practice (about 130 bytes).
FIXED_USER_BYTES = 256
# A tag and a length prefix of up to three bytes (strings below 2 MiB).
STRING_OVERHEAD = 4
# A map entry: its own tag and length, then key and value as strings.
LABEL_OVERHEAD = 4 + 2 * STRING_OVERHEAD
# The most a user within the validation limits can cost (every character
# four bytes of UTF-8; label keys are ASCII): 72,592 bytes.
MAX_USER_WIRE_BYTES = (
    FIXED_USER_BYTES
    + 4 * MAX_EMAIL_LENGTH
    + STRING_OVERHEAD
    + 4 * MAX_DISPLAY_NAME_LENGTH
    + STRING_OVERHEAD
    + MAX_ROLES * (max(len(role) for role in KNOWN_ROLES) + STRING_OVERHEAD)
    + MAX_LABELS * (LABEL_OVERHEAD + MAX_LABEL_KEY_LENGTH + 4 * MAX_LABEL_VALUE_LENGTH)
)


def _bytes(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


def user_wire_bytes(user: User) -> int:
    """An upper bound of ``user``'s encoded size inside a response. Raises
    nothing."""
    size = FIXED_USER_BYTES + 2 * STRING_OVERHEAD + _bytes(user.email) + _bytes(user.display_name)
    size += sum(STRING_OVERHEAD + _bytes(role) for role in user.roles)
    size += sum(LABEL_OVERHEAD + _bytes(key) + _bytes(value) for key, value in user.labels.items())
    return size


@dataclass(frozen=True, slots=True)
class OversizedUsers:
    """What a read of users that would pass its byte budget returns instead
    of them (usersvc.domain.ports.UserReader.get_many_within)."""

    # The size of each stored user among the ids asked for: its
    # user_wire_bytes, or a few bytes more (see
    # usersvc.adapters.repository.sizes).
    wire_bytes: Mapping[uuid.UUID, int]
    # Those of them that are deleted.
    deleted: frozenset[uuid.UUID]
