"""UpdateUser as one statement: the conditional UPDATE, its event, and the
version it replaced, in one round trip (usersvc.domain.ports.UserRepository
.update_checked; run through a unit of work by the repository, in autocommit
by usersvc.adapters.write_lane)::

    WITH before AS (SELECT <user columns> FROM users WHERE id = :user_id
                    FOR NO KEY UPDATE),
         changed AS (UPDATE users SET <patched columns>,
                            version = users.version + 1, update_time = now()
                     FROM before
                     WHERE users.id = before.id AND before.delete_time IS NULL
                       [AND before.version = :expected_version]
                       [AND <the caller is an active admin>]
                       [AND <the caller's token still holds>]
                     RETURNING <user columns>, <the fields whose value changed>),
         recorded AS (INSERT INTO events ... SELECT ... FROM changed)
    SELECT before.<user columns>, changed.<user columns>, changed_fields,
           <the caller is an active admin>, <the caller's token still holds>
    FROM (SELECT 1) AS one LEFT JOIN before ON true LEFT JOIN changed ON true

Why this shape, under READ COMMITTED:

- ``before`` locks the row. A locking read follows the row to its latest
  committed version (after waiting for a writer still in progress), even
  one committed after the statement's snapshot was taken: the rules and the
  changed fields are judged against the version the write replaces, so
  concurrent writers of one row each see the one before them.
- The rules are written on ``before``'s columns, not on the UPDATE's own row:
  the UPDATE scans the snapshot's version and rechecks its WHERE against
  the latest version only when the snapshot's passed it, so a rule on the
  snapshot's columns (a user undeleted since) could refuse a write that
  ``before`` says passes. On ``before``'s columns both agree, and the
  UPDATE writes the version ``before`` locked (nobody else can change it).
- A write that matched no row needs no second look: ``before``'s columns
  (all NULL: a missing user; the one-row ``one`` keeps the row there) and
  the caller rules say which rule refused.
- The caller rules read the caller's row as of the statement's snapshot,
  or ``before`` itself when callers change their own row. The admin rule:
  a role change needs a caller who is an active admin in the database.
  The token rule (usersvc.domain.role_checks, for a token that claims more
  than "user"): the caller's account is active and still holds every role
  the token claims; it replaces the read of the account the auth
  interceptor would otherwise make before the call, so an admin's
  UpdateUser is one round trip. Under READ COMMITTED the statement's
  snapshot is taken when the statement starts, after the token was
  verified: it sees every demotion, disable or delete committed before
  that, so at least what the separate read saw (its snapshot was a round
  trip earlier); a demotion that commits while the statement runs is not
  seen, as it was not by the read either. On the caller's own row the
  rule reads ``before``, the locked latest version. The caller's row is
  not locked: two admins changing each other's roles would then take the
  two rows' locks in opposite orders and deadlock. Each caller rule is one
  expression, used in the UPDATE's WHERE and returned as a column, so the
  verdict returned is the one the write obeyed.
- The event is written by the events module's own CTE
  (usersvc.adapters.events.events_about), with the changed fields the
  UPDATE computed.

The statements are built once per shape (which fields, etag or not, caller
rules or not, which events) and kept; a call only binds its values.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Text,
    Uuid,
    and_,
    any_,
    bindparam,
    case,
    exists,
    false,
    func,
    literal,
    null,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, array

from usersvc.adapters.database_errors import NO_CONSTRAINT_ERRORS, ConstraintErrors
from usersvc.adapters.events import USER_FIELDS, WRITES_EVENTS, call_parameters, events_about
from usersvc.adapters.orm import USERS_EMAIL_INDEX, users_table
from usersvc.adapters.repository.user_rows import USER_COLUMNS, user_from_row
from usersvc.domain.errors import EmailAlreadyExists
from usersvc.domain.events import CallContext, EventDraft, EventType
from usersvc.domain.models import ROLE_ADMIN, User
from usersvc.domain.ports import UpdateOutcome, UserUpdate

users = users_table.c

# The patchable fields, in the order changed_fields lists them (the order
# of UserPatch.changed_fields), and the bind parameter of each new value
# (UPDATE parameters must not be named like columns).
PATCHABLE = ("email", "display_name", "roles", "labels")
_NEW_VALUE = {
    "email": bindparam("new_email", type_=Text),
    "display_name": bindparam("new_display_name", type_=Text),
    "roles": bindparam("new_roles", type_=ARRAY(Text)),
    "labels": bindparam("new_labels", type_=JSONB),
}
_BEFORE_PREFIX = "before_"
# The one row the statement's result hangs on, whether the user exists or not.
_ONE = select(literal(1).label("one")).subquery("one")


@dataclass(frozen=True, slots=True)
class UpdateShape:
    """What decides the statement's text: everything but the values."""

    fields: tuple[str, ...]
    versioned: bool
    admin_rule: bool
    token_rule: bool
    events: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]


def shape_of(change: UserUpdate, drafts: Sequence[EventDraft]) -> UpdateShape:
    """The shape of ``change`` with ``drafts``. Raises ValueError for an
    empty patch (a programming error: the service refuses it first)."""
    patch = change.patch
    fields = tuple(name for name in PATCHABLE if getattr(patch, name) is not None)
    if not fields:
        raise ValueError("an update needs at least one field to change")
    return UpdateShape(
        fields=fields,
        versioned=change.expected_version is not None,
        admin_rule=change.admin_caller is not None,
        token_rule=change.role_check is not None,
        events=tuple(
            (draft.type.value, tuple(sorted(draft.attributes.items()))) for draft in drafts
        ),
    )


@functools.cache
def statement_for(shape: UpdateShape) -> Any:
    """The statement of ``shape`` (see the module docstring), built once
    per shape (a few dozen at most); its parameters are those
    ``parameters`` gives. Raises nothing."""
    user_id = bindparam("user_id", type_=Uuid)
    before = (
        select(*USER_COLUMNS)
        .where(users.id == user_id)
        .with_for_update(key_share=True)  # FOR NO KEY UPDATE
        .cte("before")
    )
    old = before.c
    rules: list[Any] = [users.id == old.id, old.delete_time.is_(None)]
    if shape.versioned:
        rules.append(old.version == bindparam("expected_version", type_=BigInteger))
    caller_rule: Any = true()
    if shape.admin_rule:
        caller_rule = _caller_is_admin(old)
        rules.append(caller_rule)
    token_rule: Any = true()
    if shape.token_rule:
        token_rule = _token_holds(old)
        rules.append(token_rule)
    values: dict[str, Any] = {name: _NEW_VALUE[name] for name in shape.fields}
    if "email" in shape.fields:
        # A new email is unverified (usersvc.adapters.email_change).
        values["email_verified"] = case(
            (users.email == _NEW_VALUE["email"], users.email_verified), else_=false()
        )
    write = (
        update(users_table)
        .where(*rules)
        .values(**values, version=users.version + 1, update_time=func.now())
        .returning(*USER_COLUMNS, _changed_fields(shape.fields, old).label("changed_fields"))
    )
    changed = write.cte("changed")
    statement = select(
        *(old[name].label(_BEFORE_PREFIX + name) for name in USER_FIELDS),
        *(changed.c[name] for name in USER_FIELDS),
        changed.c.changed_fields,
        caller_rule.label("caller_is_admin"),
        token_rule.label("token_holds"),
    ).select_from(_ONE.outerjoin(before, true()).outerjoin(changed, true()))
    drafts = [
        EventDraft(EventType(type_), attributes=dict(attributes))
        for type_, attributes in shape.events
    ]
    if drafts:
        statement = statement.add_cte(
            events_about(changed, drafts, None, changed_fields="changed_fields")
        ).execution_options(**WRITES_EVENTS)
    return statement


def _changed_fields(fields: Sequence[str], old: Any) -> Any:
    # UserPatch.changed_fields in SQL: each patched field whose new value
    # differs from the version replaced (text and text[] compare exactly,
    # jsonb by value, as the domain compares strings, tuples and dicts).
    flags: list[Any] = [
        case((users[name].is_distinct_from(old[name]), literal(name, Text)), else_=null())
        for name in fields
    ]
    return func.array_remove(array[Any](flags, type_=Text), null(), type_=ARRAY(Text))


def _caller_is_admin(old: Any) -> Any:
    caller_id = bindparam("admin_caller", type_=Uuid)
    admin = literal(ROLE_ADMIN, Text)
    caller = users_table.alias("caller")
    stored = exists().where(
        caller.c.id == caller_id,
        caller.c.delete_time.is_(None),
        caller.c.disable_time.is_(None),
        admin == any_(caller.c.roles),
    )
    itself = and_(old.delete_time.is_(None), old.disable_time.is_(None), admin == any_(old.roles))
    return case((old.id == caller_id, itself), else_=stored)


def _token_holds(old: Any) -> Any:
    # RoleCheck.settle's rule in SQL: the token's account is active and its
    # stored roles contain every role the token claims (text[] @> text[]).
    holder_id = bindparam("token_holder", type_=Uuid)
    claimed = bindparam("token_roles", type_=ARRAY(Text))
    holder = users_table.alias("holder")
    stored = exists().where(
        holder.c.id == holder_id,
        holder.c.delete_time.is_(None),
        holder.c.disable_time.is_(None),
        holder.c.roles.contains(claimed),
    )
    itself = and_(
        old.delete_time.is_(None), old.disable_time.is_(None), old.roles.contains(claimed)
    )
    return case((old.id == holder_id, itself), else_=stored)


def parameters(change: UserUpdate, context: CallContext) -> dict[str, Any]:
    """The bind parameters of ``change``'s statement in a call made in
    ``context``. Raises nothing."""
    patch = change.patch
    params: dict[str, Any] = {"user_id": change.user_id, **call_parameters(context)}
    if patch.email is not None:
        params["new_email"] = patch.email
    if patch.display_name is not None:
        params["new_display_name"] = patch.display_name
    if patch.roles is not None:
        params["new_roles"] = list(patch.roles)
    if patch.labels is not None:
        params["new_labels"] = dict(patch.labels)
    if change.expected_version is not None:
        params["expected_version"] = change.expected_version
    if change.admin_caller is not None:
        params["admin_caller"] = change.admin_caller
    role_check = change.role_check
    if role_check is not None:
        params["token_holder"] = role_check.account_id
        params["token_roles"] = sorted(role_check.principal.roles)
    return params


def constraint_errors(change: UserUpdate) -> ConstraintErrors:
    """What a violation in ``change``'s statement stands for: only a new
    email can clash. Raises nothing."""
    email = change.patch.email
    if email is None:
        return NO_CONSTRAINT_ERRORS
    taken = {"email": email}
    return {USERS_EMAIL_INDEX: lambda: EmailAlreadyExists(metadata=taken)}


def outcome_from_row(change: UserUpdate, row: Any) -> UpdateOutcome:
    """The UpdateOutcome of ``change``'s statement from its one row (a
    RowMapping or an asyncpg Record), after settling ``change.role_check``
    on it. Raises TokenRevoked when that check failed (the statement wrote
    nothing then), KeyError for a row of another statement."""
    if change.role_check is not None:
        change.role_check.settle_verdict(bool(row["token_holds"]))
    before = _user_or_none({name: row[_BEFORE_PREFIX + name] for name in USER_FIELDS})
    after = _user_or_none({name: row[name] for name in USER_FIELDS})
    return UpdateOutcome(before=before, after=after, caller_is_admin=bool(row["caller_is_admin"]))


def _user_or_none(values: dict[str, Any]) -> User | None:
    # The LEFT JOIN gives NULLs for the columns of a write that did not happen.
    return None if values["id"] is None else user_from_row(values)  # type: ignore[arg-type]
