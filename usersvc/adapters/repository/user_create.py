"""CreateUser as one statement: the INSERT of the user and of its events,
in one round trip (run in autocommit by usersvc.adapters.write_lane)::

    WITH changed AS (INSERT INTO users (id, email, password_hash,
                                        display_name, roles, labels)
                     VALUES (:new_id, :new_email, ...)
                     ON CONFLICT (lower(email)) DO NOTHING
                     RETURNING <user columns>),
         recorded AS (INSERT INTO events ... SELECT ... FROM changed)
    SELECT <user columns> FROM changed

With a privileged token's pending re-check (usersvc.domain.role_checks) the
statement also reads the caller's account and inserts only when that account
is active and holds every role the token claims; it then always returns one
row, the account's columns beside the user's (NULL when nothing was
inserted), and the check is settled on them: a failed check wrote nothing::

    WITH holder AS (SELECT id, roles, disable_time, delete_time FROM users
                    WHERE id = :holder_id),
         changed AS (INSERT INTO users (...) SELECT :new_id, ...
                     WHERE EXISTS (SELECT FROM holder WHERE <active>
                                   AND roles @> :claimed_roles)
                     ON CONFLICT (lower(email)) DO NOTHING RETURNING ...),
         recorded AS (...)
    SELECT <holder columns>, <user columns>
    FROM (SELECT 1) AS one LEFT JOIN holder ON true LEFT JOIN changed ON true

The same INSERT as the repository's (usersvc.adapters.repository.users
.SqlAlchemyUserRepository.add) and the same event CTE as UpdateUser's one
statement (usersvc.adapters.events.events_about): a taken email inserts
nothing, neither the user nor its event, and returns no row. The statement
is built once per event shape, so a call only binds its values; the
repository builds its INSERT afresh for every call.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Text, Uuid, bindparam, exists, func, literal_column, select, true
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from usersvc.adapters.database_errors import ConstraintErrors
from usersvc.adapters.events import USER_FIELDS, WRITES_EVENTS, call_parameters, events_about
from usersvc.adapters.orm import USERS_EMAIL_INDEX, users_table
from usersvc.adapters.repository.user_rows import USER_COLUMNS, settle_holder, user_from_row
from usersvc.domain.errors import EmailAlreadyExists
from usersvc.domain.events import CallContext, EventDraft, EventType
from usersvc.domain.models import NewUser, User
from usersvc.domain.role_checks import RoleCheck

users = users_table.c

# What decides the statement's text: the events' types and attributes, and
# whether it settles a role check.
CreateShape = tuple[tuple[tuple[str, tuple[tuple[str, str], ...]], ...], bool]

_NEW_VALUES = {
    "id": bindparam("new_id", type_=Uuid),
    "email": bindparam("new_email", type_=Text),
    "password_hash": bindparam("new_password_hash", type_=Text),
    "display_name": bindparam("new_display_name", type_=Text),
    "roles": bindparam("new_roles", type_=ARRAY(Text)),
    "labels": bindparam("new_labels", type_=JSONB),
}


def shape_of(drafts: Sequence[EventDraft], pending: RoleCheck | None = None) -> CreateShape:
    """The shape of a create writing ``drafts`` and settling ``pending`` (a
    role check not done yet; None: none). Raises nothing."""
    events = tuple((draft.type.value, tuple(sorted(draft.attributes.items()))) for draft in drafts)
    return events, pending is not None


@functools.cache
def statement_for(shape: CreateShape) -> Any:
    """The statement of ``shape`` (see the module docstring), built once per
    shape; its parameters are those ``parameters`` gives. Raises nothing."""
    events, settles = shape
    insert = pg_insert(users_table)
    holder: Any = None
    if settles:
        holder = (
            select(users.id, users.roles, users.disable_time, users.delete_time)
            .where(users.id == bindparam("holder_id", type_=Uuid))
            .cte("holder")
        )
        backed = exists().where(
            holder.c.delete_time.is_(None),
            holder.c.disable_time.is_(None),
            holder.c.roles.contains(bindparam("claimed_roles", type_=ARRAY(Text))),
        )
        write = insert.from_select(list(_NEW_VALUES), select(*_NEW_VALUES.values()).where(backed))
    else:
        write = insert.values(**_NEW_VALUES)
    changed = (
        write.on_conflict_do_nothing(index_elements=[func.lower(users.email)])
        .returning(*USER_COLUMNS)
        .cte("changed")
    )
    columns = [changed.c[name] for name in USER_FIELDS]
    if holder is None:
        statement = select(*columns)
    else:
        one = select(literal_column("1").label("one")).subquery("one")
        statement = select(
            holder.c.id.label("holder_id"),
            holder.c.roles.label("holder_roles"),
            holder.c.disable_time.label("holder_disable_time"),
            holder.c.delete_time.label("holder_delete_time"),
            *columns,
        ).select_from(one.outerjoin(holder, true()).outerjoin(changed, true()))
    drafts = [
        EventDraft(EventType(type_), attributes=dict(attributes)) for type_, attributes in events
    ]
    if drafts:
        statement = statement.add_cte(events_about(changed, drafts, None)).execution_options(
            **WRITES_EVENTS
        )
    return statement


def parameters(
    user_id: uuid.UUID,
    new: NewUser,
    context: CallContext,
    pending: RoleCheck | None = None,
) -> dict[str, Any]:
    """The bind parameters of the create of ``new`` with id ``user_id`` in
    a call made in ``context``, settling ``pending`` (as ``shape_of``).
    Raises nothing."""
    check: dict[str, Any] = {}
    if pending is not None:
        check = {
            "holder_id": pending.account_id,
            "claimed_roles": sorted(pending.principal.roles),
        }
    return {
        **check,
        "new_id": user_id,
        "new_email": new.email,
        "new_password_hash": new.password_hash,
        "new_display_name": new.display_name,
        "new_roles": list(new.roles),
        "new_labels": dict(new.labels),
        **call_parameters(context),
    }


def constraint_errors(new: NewUser) -> ConstraintErrors:
    """What a violation in the statement stands for. ON CONFLICT answers a
    taken email with no row; this covers what it does not. Raises nothing."""
    taken = {"email": new.email}
    return {USERS_EMAIL_INDEX: lambda: EmailAlreadyExists(metadata=taken)}


def created_user(rows: Sequence[Any], new: NewUser, pending: RoleCheck | None = None) -> User:
    """The user the statement of ``shape_of(..., pending)`` inserted, from
    its rows (RowMappings or asyncpg Records); ``pending`` is settled on
    them. Raises TokenRevoked when that check failed (nothing was written),
    EmailAlreadyExists (metadata {"email"}) when no user was inserted: the
    email is taken."""
    row = rows[0] if rows else None
    if pending is not None:
        # Always one row: the holder's columns are NULL for no account.
        settle_holder(pending, row)
    if row is None or row["id"] is None:
        raise EmailAlreadyExists(metadata={"email": new.email})
    return user_from_row(row)
