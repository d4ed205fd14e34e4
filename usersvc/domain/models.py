"""Domain objects: plain frozen dataclasses, standard library only.

Repositories return these, never ORM rows, so nothing lazy-loads after the
transaction that read them has ended.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

ROLE_USER = "user"
ROLE_ADMIN = "admin"
ROLE_SERVICE = "service"
KNOWN_ROLES = frozenset({ROLE_USER, ROLE_ADMIN, ROLE_SERVICE})


class UserState(enum.Enum):
    ACTIVE = "active"
    DISABLED = "disabled"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class User:
    """A user as the outside world may see it: never carries a password hash."""

    id: uuid.UUID
    email: str
    display_name: str
    roles: tuple[str, ...]
    labels: Mapping[str, str]
    create_time: datetime
    update_time: datetime
    disable_time: datetime | None
    delete_time: datetime | None
    version: int
    # Set by VerifyEmail, cleared when the email changes.
    email_verified: bool = False

    @property
    def state(self) -> UserState:
        # Deletion wins over disabling; undelete restores the disabled state.
        if self.delete_time is not None:
            return UserState.DELETED
        if self.disable_time is not None:
            return UserState.DISABLED
        return UserState.ACTIVE

    @property
    def etag(self) -> str:
        return etag_for(self.version)

    def has_role(self, role: str) -> bool:
        return role in self.roles


def etag_for(version: int) -> str:
    """The opaque etag of a row version (no quotes: easy to pass on a command line)."""
    return f"v{version}"


# A version no row has (versions start at 1): what an etag that etag_for
# never made stands for in a conditional write.
NO_VERSION = 0


def version_in_etag(etag: str) -> int:
    """The row version whose etag (etag_for) is exactly ``etag``, or
    NO_VERSION when no version has it ("v05", "W/x"): a write conditional
    on it then matches no row, as comparing the etags would. Raises
    nothing."""
    digits = etag[1:]
    if etag[:1] != "v" or not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        return NO_VERSION
    version = int(digits)
    return version if etag_for(version) == etag else NO_VERSION


@dataclass(frozen=True, slots=True)
class Credentials:
    """What Login needs about a user: kept apart from User so a hash can
    never reach a response mapper."""

    user: User
    # Out of repr: a dataclass repr ends up in exception texts and logs.
    password_hash: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class NewUser:
    """Validated input of a create: email already normalised, password hashed."""

    email: str
    password_hash: str = field(repr=False)
    display_name: str
    roles: tuple[str, ...]
    labels: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class UserPatch:
    """Fields to change on update; None means "leave as is"."""

    email: str | None = None
    display_name: str | None = None
    roles: tuple[str, ...] | None = None
    labels: Mapping[str, str] | None = None

    def is_empty(self) -> bool:
        return (
            self.email is None
            and self.display_name is None
            and self.roles is None
            and self.labels is None
        )

    def changed_fields(self, current: User) -> tuple[str, ...]:
        """The paths of this patch whose value differs from ``current`` (the
        user.updated event's changed_fields)."""
        changed = []
        if self.email is not None and self.email != current.email:
            changed.append("email")
        if self.display_name is not None and self.display_name != current.display_name:
            changed.append("display_name")
        if self.roles is not None and tuple(self.roles) != tuple(current.roles):
            changed.append("roles")
        if self.labels is not None and dict(self.labels) != dict(current.labels):
            changed.append("labels")
        return tuple(changed)


class RevokeReason(enum.StrEnum):
    """Why a session ended; stored in sessions.revoke_reason."""

    LOGOUT = "logout"
    REVOKE_ALL = "revoke_all"
    DISABLED = "disabled"
    DELETED = "deleted"
    PURGED = "purged"
    PASSWORD_CHANGED = "password_changed"  # noqa: S105 (a reason, not a secret)
    ROLES_CHANGED = "roles_changed"
    PASSWORD_RESET = "password_reset"  # noqa: S105 (a reason, not a secret)
    REFRESH_TOKEN_REUSE = "refresh_token_reuse"  # noqa: S105


@dataclass(frozen=True, slots=True)
class Session:
    """One login: its access tokens carry ``id`` as their ``sid`` claim, and
    its refresh tokens (stored as hashes only) are rotated within it until it
    expires or is revoked."""

    id: uuid.UUID
    user_id: uuid.UUID
    create_time: datetime
    # Absolute end: refreshing never extends a session past it.
    expire_time: datetime
    revoke_time: datetime | None
    revoke_reason: RevokeReason | None
    last_refresh_time: datetime | None = None

    def is_active(self, now: datetime) -> bool:
        """Neither revoked nor past its expire_time at ``now``. Raises
        TypeError when ``now`` is naive."""
        return self.revoke_time is None and now < self.expire_time


class PrincipalKind(enum.Enum):
    ANONYMOUS = "anonymous"
    USER = "user"
    SERVICE = "service"  # an mTLS identity (no user row)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling. Built by the auth interceptor, passed to services."""

    kind: PrincipalKind
    subject: str = ""  # user id (str) for USER, identity for SERVICE
    roles: frozenset[str] = field(default_factory=frozenset)
    session_id: str = ""
    token_id: str = ""
    # The subject parsed once: a verified token's Principal serves every
    # call the token makes (usersvc.services.tokens), and each call asks
    # for the user id several times (the policies, the role re-check).
    _user_id: uuid.UUID | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        user_id = None
        if self.kind is PrincipalKind.USER:
            with contextlib.suppress(ValueError):
                user_id = uuid.UUID(self.subject)
        object.__setattr__(self, "_user_id", user_id)

    @property
    def is_admin(self) -> bool:
        return ROLE_ADMIN in self.roles

    @property
    def is_service(self) -> bool:
        return ROLE_SERVICE in self.roles

    @property
    def is_authenticated(self) -> bool:
        return self.kind is not PrincipalKind.ANONYMOUS

    def user_id(self) -> uuid.UUID | None:
        """The caller's user id, when the caller is a user account."""
        return self._user_id


ANONYMOUS = Principal(kind=PrincipalKind.ANONYMOUS)


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 version 7): 48-bit Unix milliseconds,
    then random bits. Ids sort by creation time, which keeps B-tree inserts at
    the right edge of the index."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 68) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return uuid.UUID(int=value)
