"""Normalising and validating request fields.

The ``normalize_*`` and ``validate_*`` functions never raise: they append a
FieldViolation to the caller's list (under the field path the caller names,
e.g. "requests[3].email") and return a best-effort value, so one request
reports every bad field at once. ``raise_for_violations`` turns the list into
the error the API returns.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Iterable, Mapping, Sequence

from usersvc.domain.errors import FieldViolation, InvalidArgument, WeakPassword
from usersvc.domain.models import KNOWN_ROLES, ROLE_USER, Principal

MAX_EMAIL_LENGTH = 254
MAX_EMAIL_LOCAL_PART_BYTES = 64
MAX_DOMAIN_LENGTH = 253
MAX_DOMAIN_LABEL_LENGTH = 63
MAX_DISPLAY_NAME_LENGTH = 200
MAX_ROLES = 16
MAX_LABELS = 64
MAX_LABEL_KEY_LENGTH = 63
MAX_LABEL_VALUE_LENGTH = 256
MAX_REQUEST_ID_LENGTH = 128
# Labels that callers other than admins and services (anonymous sign-ups,
# users editing themselves) may set: a small budget, so that self sign-ups
# cannot make every listing of users large.
SELF_SERVICE_MAX_LABELS = 16
SELF_SERVICE_MAX_LABEL_BYTES = 4096
# Etags the service issues are "v<row version>"; 64 is far above any of them.
MAX_ETAG_LENGTH = 64

ME = "me"

# RFC 5322 atext, plus "." between atoms (dot-atom). Quoted local parts
# ("a b"@example.com) are legal but so rare that accepting them only invites
# confusion; non-ASCII letters are allowed (RFC 6531).
_ATEXT = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-"
)
# 1..MAX_LABEL_KEY_LENGTH characters.
_LABEL_KEY = re.compile(r"[a-z][a-z0-9_.-]{0,62}")
_UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
# Categories no human-readable text needs: controls, unpaired surrogates
# (PostgreSQL cannot store them), private use, line/paragraph separators.
_FORBIDDEN_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Zl", "Zp"})
_ASCII_WHITESPACE = " \t\r\n\x0b\x0c"
# Characters that change how text around them is shown without showing
# themselves: bidi embeddings, overrides, isolates and marks (a name that
# reads "alice" and sorts as something else), and zero-width characters.
_INVISIBLE = frozenset(
    [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
    + ["\u200e", "\u200f", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]
)
# Scripts whose letters look alike: one of them per part of an address.
_CONFUSABLE_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "GREEK"})


def has_forbidden_characters(text: str) -> bool:
    """True when ``text`` holds a control, surrogate, private-use or line
    separator character. Raises nothing."""
    if text.isascii():
        # The same answer, without a category lookup per character: the
        # only forbidden ASCII characters are the controls (Cc), exactly
        # the ASCII characters str.isprintable() refuses.
        return not text.isprintable()
    return any(unicodedata.category(ch) in _FORBIDDEN_CATEGORIES for ch in text)


def _preview(text: str, limit: int = 40) -> str:
    """A short, safe rendering of caller input for error messages."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


def normalize_email(value: str, *, field: str, errors: list[FieldViolation]) -> str:
    """The canonical form of an email, the one stored, compared for
    uniqueness and looked up: surrounding ASCII whitespace stripped, Unicode
    NFKC (so composed and decomposed letters, full-width forms and
    ligatures are one address), lower-cased, and an internationalised
    domain in its Unicode form (``xn--bcher-kva.de`` is ``bücher.de``).

    Appends a violation (under ``field``) unless the result is a plausible
    addr-spec: ``local@domain``, local part 1..64 bytes of dot-atom text,
    domain of at least two labels that IDNA accepts, at most 254 characters
    in all, no invisible characters, and no part mixing Latin, Cyrillic or
    Greek letters ("alice" spelt with a Cyrillic U+0430)."""
    email = value.strip(_ASCII_WHITESPACE)
    if not email.isascii():
        email = unicodedata.normalize("NFKC", email)
    email = email.lower()
    problem = _email_problem(email)
    if problem is None:
        local, domain = email.split("@")
        domain, problem = _canonical_domain(domain)
        email = f"{local}@{domain}"
    if problem is None and not email.isascii():
        problem = _mixed_script_problem(email)
    if problem is not None:
        errors.append(FieldViolation(field, problem))
    return email


def _canonical_domain(domain: str) -> tuple[str, str | None]:
    """The domain with every label in Unicode form (IDNA ToUnicode of its
    ToASCII form), or a problem when IDNA refuses it. Raises nothing."""
    if domain.isascii() and "xn--" not in domain:
        return domain, None
    try:
        ascii_form = domain.encode("idna")
        unicode_form = ascii_form.decode("idna").lower()
    except UnicodeError:
        return domain, "the domain is not a valid internationalised domain name"
    if len(ascii_form) > MAX_DOMAIN_LENGTH:
        return domain, f"the domain must be at most {MAX_DOMAIN_LENGTH} characters"
    return unicode_form, _domain_problem(unicode_form)


def _script(ch: str) -> str:
    return unicodedata.name(ch, "").split(" ", 1)[0]


def _mixed_script_problem(email: str) -> str | None:
    local, domain = email.split("@")
    for part in (local, *domain.split(".")):
        scripts = {_script(ch) for ch in part if ch.isalpha()} & _CONFUSABLE_SCRIPTS
        if len(scripts) > 1:
            return (
                "must not mix " + " and ".join(sorted(s.title() for s in scripts)) + " letters "
                "in one part (look-alike addresses)"
            )
    return None


def _email_problem(email: str) -> str | None:
    if not email:
        return "is required"
    if len(email) > MAX_EMAIL_LENGTH:
        return f"must be at most {MAX_EMAIL_LENGTH} characters"
    if any(ch.isspace() for ch in email) or has_forbidden_characters(email):
        return "must not contain whitespace or control characters"
    if not email.isascii() and any(unicodedata.category(ch) == "Cf" for ch in email):
        return "must not contain invisible or text-direction characters"
    if email.count("@") != 1:
        return "must contain exactly one '@'"
    local, domain = email.split("@")
    if not local:
        return "is missing the part before '@'"
    if len(local.encode("utf-8")) > MAX_EMAIL_LOCAL_PART_BYTES:
        return f"the part before '@' must be at most {MAX_EMAIL_LOCAL_PART_BYTES} bytes"
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return "the part before '@' must not start or end with '.' or contain '..'"
    if any(ch not in _ATEXT and ch != "." and ch.isascii() for ch in local):
        return "the part before '@' contains a character not allowed in an email address"
    return _domain_problem(domain)


def _domain_problem(domain: str) -> str | None:
    if not domain:
        return "is missing the domain after '@'"
    if len(domain) > MAX_DOMAIN_LENGTH:
        return f"the domain must be at most {MAX_DOMAIN_LENGTH} characters"
    labels = domain.split(".")
    if len(labels) < 2:
        return "the domain must contain a '.' (e.g. example.com)"
    for label in labels:
        if not label or len(label) > MAX_DOMAIN_LABEL_LENGTH:
            return f"each part of the domain must be 1..{MAX_DOMAIN_LABEL_LENGTH} characters"
        if label.startswith("-") or label.endswith("-"):
            return "parts of the domain must not start or end with '-'"
        if not all(ch.isalnum() or ch == "-" for ch in label):
            return "the domain may contain only letters, digits, '-' and '.'"
    if labels[-1].isdigit():
        return "the domain must not end in a number"
    return None


def normalize_display_name(value: str, *, field: str, errors: list[FieldViolation]) -> str:
    """Surrounding whitespace stripped. Appends a violation when longer than
    200 characters, holding control characters, or holding bidi controls
    (U+200E/F, U+202A..202E, U+2066..2069) or zero-width characters
    (U+200B..200D, U+2060, U+FEFF)."""
    name = value.strip()
    if len(name) > MAX_DISPLAY_NAME_LENGTH:
        errors.append(
            FieldViolation(field, f"must be at most {MAX_DISPLAY_NAME_LENGTH} characters")
        )
    elif has_forbidden_characters(name):
        errors.append(FieldViolation(field, "must not contain control characters"))
    elif not name.isascii() and not _INVISIBLE.isdisjoint(name):
        errors.append(
            FieldViolation(
                field, "must not contain text-direction (bidi) controls or zero-width characters"
            )
        )
    return name


def normalize_roles(
    values: Iterable[str], *, field: str, errors: list[FieldViolation]
) -> tuple[str, ...]:
    """Known roles only, at most 16, duplicates dropped, "user" always
    included; sorted so equal sets compare and store equally. Appends a
    violation (``field[i]`` for an unknown role) otherwise."""
    roles = list(values)
    if len(roles) > MAX_ROLES:
        errors.append(FieldViolation(field, f"must hold at most {MAX_ROLES} roles"))
        return (ROLE_USER,)
    known = ", ".join(sorted(KNOWN_ROLES))
    for index, role in enumerate(roles):
        if role not in KNOWN_ROLES:
            errors.append(
                FieldViolation(
                    f"{field}[{index}]", f"unknown role {_preview(role)}; known: {known}"
                )
            )
    return tuple(sorted({ROLE_USER, *(r for r in roles if r in KNOWN_ROLES)}))


def is_label_key(key: str) -> bool:
    """True for 1..63 characters of [a-z0-9_.-] starting with a letter.
    Raises nothing."""
    return _LABEL_KEY.fullmatch(key) is not None


def normalize_labels(
    values: Mapping[str, str], *, field: str, errors: list[FieldViolation]
) -> dict[str, str]:
    """A copy of the labels. Appends a violation for more than 64 entries, a
    malformed key (under ``field``) or a bad value (under ``field.<key>``)."""
    labels = dict(values)
    if len(labels) > MAX_LABELS:
        errors.append(FieldViolation(field, f"must hold at most {MAX_LABELS} entries"))
        return labels
    for key, value in labels.items():
        if not is_label_key(key):
            errors.append(
                FieldViolation(
                    field,
                    f"key {_preview(key)} must be 1..63 characters of [a-z0-9_.-] "
                    "starting with a letter",
                )
            )
        elif len(value) > MAX_LABEL_VALUE_LENGTH:
            errors.append(
                FieldViolation(
                    f"{field}.{key}", f"must be at most {MAX_LABEL_VALUE_LENGTH} characters"
                )
            )
        elif has_forbidden_characters(value):
            errors.append(FieldViolation(f"{field}.{key}", "must not contain control characters"))
    return labels


def check_self_service_labels(
    labels: Mapping[str, str], *, field: str, errors: list[FieldViolation]
) -> None:
    """Appends a violation under ``field`` when ``labels`` exceed what a
    caller other than an admin or a service may set: 16 entries, 4 KiB of
    keys and values together (UTF-8)."""
    if len(labels) > SELF_SERVICE_MAX_LABELS:
        errors.append(
            FieldViolation(
                field,
                f"must hold at most {SELF_SERVICE_MAX_LABELS} entries "
                "unless set by an admin or a service",
            )
        )
        return
    size = sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in labels.items())
    if size > SELF_SERVICE_MAX_LABEL_BYTES:
        errors.append(
            FieldViolation(
                field,
                f"keys and values must total at most {SELF_SERVICE_MAX_LABEL_BYTES} bytes "
                "unless set by an admin or a service",
            )
        )


def validate_request_id(value: str, *, field: str, errors: list[FieldViolation]) -> str:
    """Empty (no idempotency) or at most 128 printable characters."""
    if len(value) > MAX_REQUEST_ID_LENGTH:
        errors.append(FieldViolation(field, f"must be at most {MAX_REQUEST_ID_LENGTH} characters"))
    elif not value.isprintable() or has_forbidden_characters(value):
        errors.append(FieldViolation(field, "must contain printable characters only"))
    return value


def validate_etag(value: str, *, field: str, errors: list[FieldViolation]) -> str:
    """Empty (an unconditional write) or at most 64 characters. Appends a
    violation otherwise; a well-sized but stale etag is the caller's
    EtagMismatch, not a violation."""
    if len(value) > MAX_ETAG_LENGTH:
        errors.append(FieldViolation(field, f"must be at most {MAX_ETAG_LENGTH} characters"))
    return value


def validate_sizes(
    *,
    email: str,
    display_name: str,
    roles: Sequence[str],
    labels: Mapping[str, str],
    prefix: str,
    errors: list[FieldViolation],
) -> None:
    """The size limits of a user's writable fields, and nothing else: for
    fields a request carries but does not use (UpdateUser fields outside the
    update mask), which are ignored yet must not be unbounded. Appends one
    violation per oversized field, named ``<prefix>.<field>``."""
    limits = (
        ("email", len(email), MAX_EMAIL_LENGTH, "characters"),
        ("display_name", len(display_name), MAX_DISPLAY_NAME_LENGTH, "characters"),
        ("roles", len(roles), MAX_ROLES, "roles"),
        ("labels", len(labels), MAX_LABELS, "entries"),
    )
    for name, size, limit, unit in limits:
        if size > limit:
            errors.append(FieldViolation(f"{prefix}.{name}", f"must hold at most {limit} {unit}"))
    for key, value in labels.items():
        if len(key) > MAX_LABEL_KEY_LENGTH or len(value) > MAX_LABEL_VALUE_LENGTH:
            errors.append(
                FieldViolation(
                    f"{prefix}.labels",
                    f"keys must be at most {MAX_LABEL_KEY_LENGTH} characters and values at "
                    f"most {MAX_LABEL_VALUE_LENGTH}",
                )
            )
            break


def parse_user_id(text: str, field: str, principal: Principal) -> uuid.UUID:
    """A user id in canonical UUID form, or "me" for the calling user.

    Raises InvalidArgument (one violation under ``field``) for anything else,
    and for "me" from a caller that is not a user account (an mTLS service
    identity has no user row; anonymous callers are refused before this by
    the policies).
    """
    if text == ME:
        own = principal.user_id()
        if own is None:
            raise InvalidArgument.single(
                field, '"me" names the calling user, and this caller is not a user account'
            )
        return own
    if not text:
        raise InvalidArgument.single(field, 'is required (a user id or "me")')
    if _UUID_TEXT.fullmatch(text) is None:
        raise InvalidArgument.single(
            field, f'must be a user id (UUID) or "me", got {_preview(text)}'
        )
    return uuid.UUID(text)


def raise_for_violations(
    violations: Sequence[FieldViolation], password_violations: Sequence[FieldViolation] = ()
) -> None:
    """Raises InvalidArgument carrying every violation when any field other
    than a password is bad, WeakPassword when only passwords are; returns when
    there is nothing to report."""
    if violations:
        raise InvalidArgument([*violations, *password_violations])
    if password_violations:
        raise WeakPassword(password_violations)
