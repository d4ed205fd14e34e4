"""Password rules, after NIST SP 800-63B: a length range and a blocklist of
common passwords, no composition rules (they push people to "Password1!")."""

from __future__ import annotations

import functools
from importlib import resources

from usersvc.domain.errors import FieldViolation, WeakPassword

MIN_PASSWORD_BYTES = 8
# bcrypt reads at most 72 bytes; longer passwords are refused, never
# truncated, so that what the user typed is exactly what is checked.
MAX_PASSWORD_BYTES = 72


@functools.cache
def common_passwords() -> frozenset[str]:
    """The bundled blocklist (usersvc/data/common_passwords.txt), lower-case,
    read once on first use. Raises OSError when the package data is missing."""
    text = (
        resources.files("usersvc").joinpath("data/common_passwords.txt").read_text(encoding="utf-8")
    )
    return frozenset(
        line.strip().lower()
        for line in text.splitlines()
        if line.strip() and not line.startswith("# ")
    )


class PasswordPolicy:
    """Decides whether a new password is acceptable."""

    def __init__(self, blocklist: frozenset[str] | None = None) -> None:
        # None: the bundled list, loaded on the first check rather than at
        # start-up or import.
        self._blocklist = blocklist

    def violations(
        self, password: str, *, field: str, email: str | None = None
    ) -> list[FieldViolation]:
        """Every problem with ``password`` as violations of ``field``; empty
        when it is acceptable. ``email`` (normalised) enables the check that
        the password is not the email or its local part. Raises nothing."""
        try:
            size = len(password.encode("utf-8"))
        except UnicodeEncodeError:
            return [FieldViolation(field, "must be valid Unicode text")]
        if size == 0:
            return [FieldViolation(field, "is required")]
        problems: list[FieldViolation] = []
        if size < MIN_PASSWORD_BYTES:
            problems.append(
                FieldViolation(field, f"must be at least {MIN_PASSWORD_BYTES} bytes long")
            )
        if size > MAX_PASSWORD_BYTES:
            problems.append(
                FieldViolation(field, f"must be at most {MAX_PASSWORD_BYTES} bytes long (UTF-8)")
            )
        folded = password.lower()
        blocklist = common_passwords() if self._blocklist is None else self._blocklist
        if folded in blocklist:
            problems.append(FieldViolation(field, "is too common; choose another"))
        if email and folded in (email.lower(), email.lower().partition("@")[0]):
            problems.append(FieldViolation(field, "must not be the email address"))
        return problems

    def check(self, password: str, *, field: str, email: str | None = None) -> None:
        """Raises WeakPassword listing every problem with ``password``."""
        problems = self.violations(password, field=field, email=email)
        if problems:
            raise WeakPassword(problems)
