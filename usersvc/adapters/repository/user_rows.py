"""The users table as the repository and the read lane see it: the columns a
User carries, the hot reads (built once: only the parameters change from call
to call) and the mapping of rows to domain objects. Both paths use these very
statements and this mapping, so they return the same users."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ARRAY, Uuid, any_, bindparam, func, literal_column, select, true
from sqlalchemy.engine import RowMapping
from sqlalchemy.sql import ColumnElement, FromClause, Select

from usersvc.adapters.orm import users_table
from usersvc.domain.models import Credentials, User
from usersvc.domain.role_checks import RoleCheck

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


# The same reads with the caller's account alongside, for the re-check of a
# privileged token (usersvc.domain.role_checks) in the statement of the read
# itself: a LEFT JOIN from a one-row relation to the account, then to the
# users read, so there is always a row to tell "no such account" (holder_id
# NULL) from "no such user" (id NULL).
_holder = users_table.alias("holder")
_target = users_table.alias("target")
HOLDER_COLUMNS = (
    _holder.c.id.label("holder_id"),
    _holder.c.roles.label("holder_roles"),
    _holder.c.disable_time.label("holder_disable_time"),
    _holder.c.delete_time.label("holder_delete_time"),
)


def _with_holder(target_matches: ColumnElement[bool]) -> Select[Any]:
    one = select(literal_column("1").label("one")).subquery("one")
    return select(
        *HOLDER_COLUMNS, *(_target.c[column.name] for column in USER_COLUMNS)
    ).select_from(
        one.outerjoin(_holder, _holder.c.id == bindparam("holder_id")).outerjoin(
            _target, target_matches
        )
    )


def with_holder(*relations: FromClause) -> Select[Any]:
    """The columns of ``relations`` with the caller's account
    (HOLDER_COLUMNS, parameter "holder_id") alongside, all LEFT JOINed to a
    one-row relation: there is always a row, so an empty relation still
    tells the account. Raises nothing."""
    one = select(literal_column("1").label("one")).subquery("one")
    joined = one.outerjoin(_holder, _holder.c.id == bindparam("holder_id"))
    for relation in relations:
        joined = joined.outerjoin(relation, true())
    return select(*HOLDER_COLUMNS, *(c for relation in relations for c in relation.c)).select_from(
        joined
    )


GET_USER_BY_ID_WITH_HOLDER = _with_holder(_target.c.id == bindparam("user_id"))
GET_USER_BY_EMAIL_WITH_HOLDER = _with_holder(
    func.lower(_target.c.email) == func.lower(bindparam("email"))
)
GET_USERS_BY_IDS_WITH_HOLDER = _with_holder(
    _target.c.id == any_(bindparam("user_ids", type_=ARRAY(Uuid)))
)


def settle_holder(role_check: RoleCheck, row: Any) -> None:
    """Settle ``role_check`` on the holder columns of a row of a
    ``*_WITH_HOLDER`` read. Raises TokenRevoked when it fails."""
    role_check.settle(
        active=row["holder_id"] is not None
        and row["holder_disable_time"] is None
        and row["holder_delete_time"] is None,
        roles=row["holder_roles"] or (),
    )


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
