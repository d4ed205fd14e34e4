"""Inputs and results of the services: what the API layer builds from proto
messages and turns back into them. Plain data, standard library only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from usersvc.domain.models import User, UserPatch


@dataclass(frozen=True, slots=True)
class CreateUserInput:
    """Raw, unvalidated fields of a CreateUserRequest."""

    email: str
    password: str = field(repr=False)
    display_name: str = ""
    roles: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True, slots=True)
class UpdateUserInput:
    """An UpdateUserRequest after the field mask was applied: ``patch`` holds
    only the fields the mask selects (values unvalidated)."""

    user_id: str
    etag: str
    patch: UserPatch


@dataclass(frozen=True, slots=True)
class ListUsersInput:
    page_size: int = 0
    page_token: str = ""
    filter: str = ""
    order_by: str = ""
    show_deleted: bool = False


@dataclass(frozen=True, slots=True)
class UserListResult:
    users: tuple[User, ...]
    next_page_token: str
    total_size: int


@dataclass(frozen=True, slots=True)
class LoginResult:
    access_token: str = field(repr=False)
    refresh_token: str = field(repr=False)
    token_type: str
    expires_in: int
    user: User


@dataclass(frozen=True, slots=True)
class TokenIntrospection:
    """What IntrospectToken tells about an access token. Inactive: every
    other field is empty."""

    active: bool
    subject: str = ""
    roles: tuple[str, ...] = ()
    session_id: str = ""
    expire_time: datetime | None = None
