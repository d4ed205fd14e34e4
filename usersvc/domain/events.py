"""Lifecycle and security events: the audit trail and transactional outbox.

A service says what happened with an EventDraft handed to the repository
call that makes the change; the adapter writes the event in the same
statement and transaction, adding the user as it is after the change, the
actor and the request id of the call. Readers get StoredEvents, numbered in
commit order by the sequencer.

No event ever holds a password, hash, token or code: drafts carry only a
type, changed field paths and small attributes, and the user snapshot is
taken from the user columns that never include the password hash.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from usersvc.domain.models import Principal, PrincipalKind, User


class EventType(enum.StrEnum):
    """The types of usersvc.v1.Event; also their NATS subjects."""

    USER_CREATED = "usersvc.user.created.v1"
    USER_UPDATED = "usersvc.user.updated.v1"
    USER_DELETED = "usersvc.user.deleted.v1"
    USER_UNDELETED = "usersvc.user.undeleted.v1"
    USER_PURGED = "usersvc.user.purged.v1"
    USER_DISABLED = "usersvc.user.disabled.v1"
    USER_ENABLED = "usersvc.user.enabled.v1"
    USER_PASSWORD_CHANGED = "usersvc.user.password_changed.v1"  # noqa: S105 (an event name)
    USER_PASSWORD_RESET = "usersvc.user.password_reset.v1"  # noqa: S105
    USER_EMAIL_VERIFIED = "usersvc.user.email_verified.v1"
    LOGIN_SUCCEEDED = "usersvc.auth.login_succeeded.v1"
    LOGIN_FAILED = "usersvc.auth.login_failed.v1"
    ACCOUNT_LOCKED = "usersvc.auth.account_locked.v1"
    SESSION_REVOKED = "usersvc.auth.session_revoked.v1"
    REFRESH_TOKEN_REUSED = "usersvc.auth.refresh_token_reused.v1"  # noqa: S105


class LoginFailureCause(enum.StrEnum):
    """The ``cause`` attribute of auth.login_failed."""

    UNKNOWN_EMAIL = "unknown_email"
    WRONG_PASSWORD = "wrong_password"  # noqa: S105 (a cause, not a password)
    LOCKED = "locked"
    DISABLED = "disabled"


# Attribute values are short facts; longer text is cut, so that no caller
# can turn an event into a store for arbitrary data.
MAX_ATTRIBUTE_LENGTH = 200


@dataclass(frozen=True, slots=True)
class EventDraft:
    """An event to write with a change. The user, actor, request id, id and
    time are filled in by the adapter."""

    type: EventType
    changed_fields: tuple[str, ...] = ()
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class CallContext:
    """Who made the change and in which call: stored with each event."""

    actor: str = ""
    request_id: str = ""


NO_CALL = CallContext()


def actor_of(principal: Principal) -> str:
    """The ``actor`` of events caused by ``principal``: the user id, or
    "service:<identity>" for a certificate identity, or "" when anonymous.
    Raises nothing."""
    match principal.kind:
        case PrincipalKind.USER:
            return principal.subject
        case PrincipalKind.SERVICE:
            return f"service:{principal.subject}"
        case _:
            return ""


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as readers see it: numbered, in the trail."""

    id: uuid.UUID
    sequence: int
    type: str
    user_id: uuid.UUID | None
    actor: str
    request_id: str
    create_time: datetime
    user: User | None
    changed_fields: tuple[str, ...]
    attributes: Mapping[str, str]


class EventFilterField(enum.Enum):
    TYPE = "type"
    USER_ID = "user_id"
    ACTOR = "actor"
    CREATE_TIME = "create_time"


@dataclass(frozen=True, slots=True)
class EventComparison:
    """One term of an events filter. ``op`` is one of "=", "!=", "<", "<=",
    ">", ">=", ":" (":" on text means "contains"; on user_id and create_time
    it means "="). ``value`` is text, a UUID (user_id) or an aware UTC
    datetime (create_time)."""

    field: EventFilterField
    op: str
    value: str | uuid.UUID | datetime


@dataclass(frozen=True, slots=True)
class EventFilter:
    """A conjunction of comparisons; empty matches every event."""

    terms: tuple[EventComparison, ...] = ()


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Numbered events after ``after_sequence`` matching ``filter``, at most
    ``limit``, in ascending sequence."""

    filter: EventFilter
    after_sequence: int
    limit: int
