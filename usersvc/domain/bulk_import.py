"""Importing users whose passwords are already bcrypt hashes: what a valid
hash looks like, what a row that passed validation holds, and the stable
reasons a row is refused for. Standard library only."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

# Reasons of a refused row (ImportRowError.reason): stable, for programs.
REASON_INVALID_ARGUMENT = "INVALID_ARGUMENT"
REASON_INVALID_PASSWORD_HASH = "INVALID_PASSWORD_HASH"  # noqa: S105 (a reason, not a secret)
REASON_EMAIL_ALREADY_EXISTS = "EMAIL_ALREADY_EXISTS"

BCRYPT_HASH_LENGTH = 60
# The costs this service verifies at all. Each step doubles the work: cost 16
# is 16 times the default cost 12 (about 4 s of one core), the most one call
# may cost (docs/operations.md, "bcrypt"); cost 31 would be days.
MIN_BCRYPT_COST = 4
MAX_BCRYPT_COST = 16
# $2a$ and $2y$ are the same algorithm as $2b$ for every password this
# service accepts (at most 72 bytes); $2x$ marks hashes of a known-broken
# implementation and $2$ predates the cost field, so neither is taken.
# [0-9], not \d: \d also matches other scripts' digits, which int() reads.
_BCRYPT_HASH = re.compile(r"\$2[aby]\$([0-9]{2})\$([./A-Za-z0-9]{22})([./A-Za-z0-9]{31})")
_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
# bcrypt's base64 leaves spare low bits in the last character of the salt
# (16 bytes in 22 characters: 4 bits) and of the hash (23 bytes in 31: 2
# bits), and writes them as zero. A salt with them set is refused by the
# bcrypt library at login ("Invalid salt"), a hash with them set can never
# match: either way the user could never log in, so the row is refused now.
_SALT_LAST = frozenset(_ALPHABET[::16])
_HASH_LAST = frozenset(_ALPHABET[::4])


def bcrypt_hash_problem(value: str) -> str | None:
    """Why ``value`` is not a bcrypt hash this service can verify, or None
    when it is one. The description never quotes the value. Raises
    nothing."""
    if len(value) != BCRYPT_HASH_LENGTH:
        return f"must be a bcrypt hash of exactly {BCRYPT_HASH_LENGTH} characters"
    match = _BCRYPT_HASH.fullmatch(value)
    if match is None:
        return (
            'must be a bcrypt hash: "$2a$", "$2b$" or "$2y$", a two-digit cost, "$", '
            "then 53 characters of [./A-Za-z0-9]"
        )
    cost = int(match.group(1))
    if not MIN_BCRYPT_COST <= cost <= MAX_BCRYPT_COST:
        return f"bcrypt cost must be {MIN_BCRYPT_COST:02d}..{MAX_BCRYPT_COST}, got {cost:02d}"
    if match.group(2)[-1] not in _SALT_LAST or match.group(3)[-1] not in _HASH_LAST:
        return "is not a bcrypt hash as bcrypt writes one (its salt or hash is malformed)"
    return None


@dataclass(frozen=True, slots=True)
class ImportedUser:
    """A row of an import that passed validation: email normalised, hash
    checked (and stored as is), roles normalised. ``create_time`` None
    means the time of the import."""

    email: str
    password_hash: str = field(repr=False)
    display_name: str
    roles: tuple[str, ...]
    labels: Mapping[str, str]
    create_time: datetime | None = None
    email_verified: bool = False
