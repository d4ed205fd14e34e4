"""Email verification and password reset codes: what one looks like and how
long it lives. Standard library only; usersvc.services.account_codes makes
and checks them.

A code is 8 characters of a 32-letter alphabet (A-Z and 2-9 without I, O, 0
and 1, which people confuse): 40 bits from ``secrets``, typed by a person,
accepted in any case. Only a keyed hash of it is ever stored.
"""

from __future__ import annotations

import enum

CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 8
# Each character carries 5 bits.
CODE_BITS = CODE_LENGTH * 5
# Wrong codes presented against one live code before it is void.
MAX_CODE_ATTEMPTS = 5
# A longer code field is refused as a malformed request, not looked at.
MAX_CODE_FIELD_LENGTH = 64

_ALPHABET_SET = frozenset(CODE_ALPHABET)


class CodeKind(enum.StrEnum):
    """What a code proves; stored in user_codes.kind."""

    EMAIL_VERIFICATION = "email_verification"
    PASSWORD_RESET = "password_reset"  # noqa: S105 (a kind, not a secret)


def normalize_code(text: str) -> str | None:
    """The canonical (upper-case) form of a code as a person typed it, or
    None when it cannot be a code of ours (length, alphabet). Surrounding
    whitespace is ignored. Raises nothing."""
    canonical = text.strip().upper()
    if len(canonical) != CODE_LENGTH or not _ALPHABET_SET.issuperset(canonical):
        return None
    return canonical
