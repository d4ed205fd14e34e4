"""CreateUser as one statement: the INSERT of the user and of its events,
in one round trip (run in autocommit by usersvc.adapters.write_lane)::

    WITH changed AS (INSERT INTO users (id, email, password_hash,
                                        display_name, roles, labels)
                     VALUES (:new_id, :new_email, ...)
                     ON CONFLICT (lower(email)) DO NOTHING
                     RETURNING <user columns>),
         recorded AS (INSERT INTO events ... SELECT ... FROM changed)
    SELECT <user columns> FROM changed

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

from sqlalchemy import Text, Uuid, bindparam, func, select
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.dialects.postgresql import insert as pg_insert

from usersvc.adapters.database_errors import ConstraintErrors
from usersvc.adapters.events import USER_FIELDS, WRITES_EVENTS, call_parameters, events_about
from usersvc.adapters.orm import USERS_EMAIL_INDEX, users_table
from usersvc.adapters.repository.user_rows import USER_COLUMNS, user_from_row
from usersvc.domain.errors import EmailAlreadyExists
from usersvc.domain.events import CallContext, EventDraft, EventType
from usersvc.domain.models import NewUser, User

users = users_table.c

# What decides the statement's text: the events' types and attributes.
CreateShape = tuple[tuple[str, tuple[tuple[str, str], ...]], ...]


def shape_of(drafts: Sequence[EventDraft]) -> CreateShape:
    """The shape of a create writing ``drafts``. Raises nothing."""
    return tuple((draft.type.value, tuple(sorted(draft.attributes.items()))) for draft in drafts)


@functools.cache
def statement_for(shape: CreateShape) -> Any:
    """The statement of ``shape`` (see the module docstring), built once per
    shape; its parameters are those ``parameters`` gives. Raises nothing."""
    write = (
        pg_insert(users_table)
        .values(
            id=bindparam("new_id", type_=Uuid),
            email=bindparam("new_email", type_=Text),
            password_hash=bindparam("new_password_hash", type_=Text),
            display_name=bindparam("new_display_name", type_=Text),
            roles=bindparam("new_roles", type_=ARRAY(Text)),
            labels=bindparam("new_labels", type_=JSONB),
        )
        .on_conflict_do_nothing(index_elements=[func.lower(users.email)])
        .returning(*USER_COLUMNS)
    )
    changed = write.cte("changed")
    statement = select(*(changed.c[name] for name in USER_FIELDS))
    drafts = [
        EventDraft(EventType(type_), attributes=dict(attributes)) for type_, attributes in shape
    ]
    if drafts:
        statement = statement.add_cte(events_about(changed, drafts, None)).execution_options(
            **WRITES_EVENTS
        )
    return statement


def parameters(user_id: uuid.UUID, new: NewUser, context: CallContext) -> dict[str, Any]:
    """The bind parameters of the create of ``new`` with id ``user_id`` in
    a call made in ``context``. Raises nothing."""
    return {
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


def created_user(rows: Sequence[Any], new: NewUser) -> User:
    """The user the statement inserted, from its rows (RowMappings or asyncpg
    Records). Raises EmailAlreadyExists (metadata {"email"}) when it inserted
    none: the email is taken."""
    if not rows:
        raise EmailAlreadyExists(metadata={"email": new.email})
    return user_from_row(rows[0])
