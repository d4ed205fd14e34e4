"""The users table as the repository and the read lane see it: the columns a
User carries, the hot reads (built once: only the parameters change from call
to call) and the mapping of rows to domain objects. Both paths use these very
statements and this mapping, so they return the same users."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ARRAY, Uuid, any_, bindparam, func, select
from sqlalchemy.engine import RowMapping
from sqlalchemy.sql import Select

from usersvc.adapters.orm import users_table
from usersvc.domain.models import Credentials, User

users = users_table.c

# Everything but the password hash: a User never carries it.
USER_COLUMNS = (
    users.id,
    users.email,
    users.display_name,
    users.roles,
    users.labels,
    users.create_time,
    users.update_time,
    users.disable_time,
    users.delete_time,
    users.version,
    users.email_verified,
)
CREDENTIAL_COLUMNS = (*USER_COLUMNS, users.password_hash)

SELECT_USERS = select(*USER_COLUMNS)
GET_USER_BY_ID = SELECT_USERS.where(users.id == bindparam("user_id"))
GET_USER_BY_EMAIL = SELECT_USERS.where(func.lower(users.email) == func.lower(bindparam("email")))
# The read lane's batch read takes one array instead of an IN list, so that
# its text (and asyncpg's prepared statement) is the same for any count.
GET_USERS_BY_IDS = SELECT_USERS.where(users.id == any_(bindparam("user_ids", type_=ARRAY(Uuid))))


def users_by_ids(user_ids: Sequence[uuid.UUID]) -> Select[Any]:
    """The users among ``user_ids``: one statement (an expanding IN, so
    its compiled form is cached whatever the count). Raises nothing."""
    return SELECT_USERS.where(users.id.in_(list(set(user_ids))))


def user_from_row(row: RowMapping) -> User:
    """The domain User of a row of the user columns (a RowMapping, or an
    asyncpg Record on the read lane). Raises KeyError for a row without
    them."""
    return User(
        id=row["id"],
        email=row["email"],
        display_name=row["display_name"],
        roles=tuple(row["roles"]),
        labels=dict(row["labels"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        disable_time=row["disable_time"],
        delete_time=row["delete_time"],
        version=row["version"],
        email_verified=row["email_verified"],
    )


def credentials_from_row(row: RowMapping) -> Credentials:
    """A user and its password hash, from a row of CREDENTIAL_COLUMNS.
    Raises KeyError for a row without them."""
    return Credentials(user=user_from_row(row), password_hash=row["password_hash"])
