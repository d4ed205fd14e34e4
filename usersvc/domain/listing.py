"""What ListUsers asks of a repository: a parsed filter, an ordering and a
keyset cursor. Parsing (``usersvc.domain.filtering``) and page tokens
(``usersvc.services.pagination``) produce these; the SQL adapter consumes them.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from datetime import datetime

from usersvc.domain.models import User, UserState


class SortField(enum.Enum):
    CREATE_TIME = "create_time"
    EMAIL = "email"
    DISPLAY_NAME = "display_name"


@dataclass(frozen=True, slots=True)
class Ordering:
    field: SortField = SortField.CREATE_TIME
    descending: bool = False

    def canonical(self) -> str:
        return self.field.value + (" desc" if self.descending else "")


class Op(enum.Enum):
    EQ = "="
    NE = "!="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    HAS = ":"


class FilterField(enum.Enum):
    EMAIL = "email"
    DISPLAY_NAME = "display_name"
    STATE = "state"
    ROLES = "roles"
    CREATE_TIME = "create_time"
    LABELS = "labels"  # with label_key set: labels.<key>; without: labels:"key"
    EMAIL_VERIFIED = "email_verified"


# A literal: text for strings, a datetime for create_time, a UserState for
# state, a bool for email_verified; None with Op.HAS means "present"
# (``labels.team:*``).
FilterValue = str | bool | datetime | UserState | None


@dataclass(frozen=True, slots=True)
class Comparison:
    field: FilterField
    op: Op
    value: FilterValue
    label_key: str | None = None


@dataclass(frozen=True, slots=True)
class Filter:
    """A conjunction of comparisons; empty matches everything."""

    terms: tuple[Comparison, ...] = ()


@dataclass(frozen=True, slots=True)
class Cursor:
    """The sort key of the last row of a page: the next page starts after it."""

    sort_value: str | datetime
    id: uuid.UUID


def cursor_of(field: SortField, user: User) -> Cursor:
    """The cursor of the page that starts after ``user`` in an ordering by
    ``field``. Raises nothing."""
    sort_value: str | datetime
    match field:
        case SortField.CREATE_TIME:
            sort_value = user.create_time
        case SortField.EMAIL:
            sort_value = user.email
        case SortField.DISPLAY_NAME:
            sort_value = user.display_name
    return Cursor(sort_value=sort_value, id=user.id)


@dataclass(frozen=True, slots=True)
class ListQuery:
    filter: Filter
    ordering: Ordering
    show_deleted: bool
    page_size: int
    after: Cursor | None = None
    # When set, the page ends before the user that would take the users'
    # summed usersvc.domain.wire_size.user_wire_bytes (or an adapter's
    # upper bound of it) past this many bytes (the first user always
    # counts), and the query reads no further than that user: it tells
    # that more follow.
    max_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class Page:
    users: tuple[User, ...]
    # Cursor of the last row when more rows may follow, else None.
    next_cursor: Cursor | None


@dataclass(frozen=True, slots=True)
class ListedPage:
    """A page read by usersvc.domain.ports.UserReader.list_unfiltered."""

    page: Page
    # The number of matches, when it was asked for and the page's own read
    # could tell it; None: the caller counts (UserRepository.count_matches).
    total_size: int | None = None
