"""Codes and batch writes on PostgreSQL: usersvc.domain.ports.AccountRepository.

Codes live in ``user_codes`` as HMAC-SHA256 values (the key never reaches
the database). Checking and using a code is one conditional UPDATE: it
consumes the code when the presented hash matches and counts a wrong try
otherwise, and PostgreSQL's row lock plus the re-check of its WHERE clause
after a concurrent update (READ COMMITTED) make that atomic: of two callers
with the right code, the second finds the code used and changes nothing.
Comparing the keyed hashes in SQL leaks nothing useful: without the key
nobody can choose a code whose hash shares a prefix with the stored one.

The batch writes take the whole batch as one array per column (unnest), so
1000 users are one UPDATE, not 1000; their events (one per user and draft,
usersvc.adapters.events) are written by the same statement.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    DateTime,
    Integer,
    LargeBinary,
    Text,
    Uuid,
    bindparam,
    func,
    text,
    true,
    update,
)
from sqlalchemy.engine import RowMapping

from usersvc.adapters.database_errors import ConstraintErrors
from usersvc.adapters.events import WRITES_EVENTS, snapshot_sql, with_events
from usersvc.adapters.orm import USERS_EMAIL_INDEX, users_table
from usersvc.adapters.repository.base import SqlAlchemyRepository
from usersvc.adapters.repository.user_rows import USER_COLUMNS, user_from_row
from usersvc.domain.codes import CodeKind
from usersvc.domain.errors import EmailAlreadyExists, UserNotFound
from usersvc.domain.events import EventDraft
from usersvc.domain.models import User, uuid7
from usersvc.domain.ports import UserWrite

# The columns of a User (never the password hash), for RETURNING.
_USER_COLUMNS = (
    "users.id, users.email, users.display_name, users.roles, users.labels, users.create_time, "
    "users.update_time, users.disable_time, users.delete_time, users.version, "
    "users.email_verified"
)

# A swap of emails inside one batch, or a concurrent writer, can still meet
# the unique index in the UPDATE itself.
_EMAIL_TAKEN: ConstraintErrors = {USERS_EMAIL_INDEX: EmailAlreadyExists}

_RELAX_COMMIT = text("SET LOCAL synchronous_commit TO off")

_LOCK_USERS = text(
    f"SELECT {_USER_COLUMNS} FROM users WHERE users.id = ANY(CAST(:user_ids AS uuid[])) "  # noqa: S608
    "ORDER BY users.id FOR UPDATE"
)
# FOR NO KEY UPDATE: serialises code creation for the user without blocking
# the foreign key checks of a concurrent login's session insert.
_LOCK_ACTIVE_BY_EMAIL = text(
    "SELECT id FROM users WHERE lower(email) = lower(:email) "
    "AND delete_time IS NULL AND disable_time IS NULL FOR NO KEY UPDATE"
).bindparams(bindparam("email", type_=Text()))

_VOID_LIVE_CODE = text(
    "UPDATE user_codes SET void_time = now() WHERE user_id = :user_id AND kind = :kind "
    "AND use_time IS NULL AND void_time IS NULL"
).bindparams(bindparam("user_id", type_=Uuid()), bindparam("kind", type_=Text()))
# Through users: for a user that does not exist this inserts nothing (no
# foreign key error), after the same work.
_INSERT_CODE = text(
    "INSERT INTO user_codes (id, user_id, kind, code_hash, expire_time) "
    "SELECT :code_id, users.id, :kind, :code_hash, :expire_time FROM users "
    "WHERE users.id = :user_id RETURNING id"
).bindparams(
    bindparam("code_id", type_=Uuid()),
    bindparam("user_id", type_=Uuid()),
    bindparam("kind", type_=Text()),
    bindparam("code_hash", type_=LargeBinary()),
    bindparam("expire_time", type_=DateTime(timezone=True)),
)

# The one statement that decides a presented code. Every right-hand side
# reads the row as it was before this UPDATE. Parameter names differ from
# column names (in an UPDATE a same-named parameter would be taken as the
# column's new value).
_CONSUME_SET = """
    UPDATE user_codes AS c SET
        use_time = CASE WHEN c.code_hash = :presented_hash THEN :check_time END,
        attempts = c.attempts + CASE WHEN c.code_hash = :presented_hash THEN 0 ELSE 1 END,
        void_time = CASE
            WHEN c.code_hash <> :presented_hash AND c.attempts + 1 >= :max_attempts
            THEN :check_time END
"""
_CONSUME_LIVE = """
    c.kind = :code_kind AND c.use_time IS NULL AND c.void_time IS NULL
    AND c.expire_time > :check_time
"""
_CONSUME_PARAMS = (
    bindparam("presented_hash", type_=LargeBinary()),
    bindparam("check_time", type_=DateTime(timezone=True)),
    bindparam("max_attempts", type_=Integer()),
    bindparam("code_kind", type_=Text()),
)
_CONSUME_BY_ID = text(
    _CONSUME_SET
    + " WHERE c.user_id = :code_user_id AND "
    + _CONSUME_LIVE
    + " RETURNING c.user_id, c.use_time IS NOT NULL AS consumed"
).bindparams(*_CONSUME_PARAMS, bindparam("code_user_id", type_=Uuid()))
_CONSUME_BY_EMAIL = text(
    _CONSUME_SET
    + " FROM users AS u WHERE c.user_id = u.id AND lower(u.email) = lower(:code_email)"
    + " AND u.delete_time IS NULL AND u.disable_time IS NULL AND "
    + _CONSUME_LIVE
    + " RETURNING c.user_id, c.use_time IS NOT NULL AS consumed"
).bindparams(*_CONSUME_PARAMS, bindparam("code_email", type_=Text()))

_SET_EMAIL_VERIFIED = (
    update(users_table)
    .where(users_table.c.id == bindparam("verified_id", type_=Uuid()))
    .values(email_verified=true(), version=users_table.c.version + 1, update_time=func.now())
    .returning(*USER_COLUMNS)
)

_TAKEN_EMAILS = text(
    "SELECT lower(email) AS email FROM users "
    "WHERE lower(email) = ANY(CAST(:emails AS text[])) "
    "AND id <> ALL(CAST(:except_ids AS uuid[]))"
)

# The batch: one row per item; NULL in a column means "leave as is". Roles
# travel as array literals and labels as JSON texts (arrays of arrays must
# be rectangular).
_BATCH_INPUT = """
    unnest(
        CAST(:ids AS uuid[]),
        CAST(:emails AS text[]),
        CAST(:display_names AS text[]),
        CAST(:roles AS text[]),
        CAST(:labels AS jsonb[]),
        CAST(:changed AS text[])
    ) AS v (id, email, display_name, roles, labels, changed)
"""
# One event per changed user and draft: the user after the change, the
# draft's type and attributes, the item's changed fields (none for deletes).
_RECORD = f"""
    recorded AS (
        INSERT INTO events (id, type, user_id, actor, request_id, user_snapshot,
                            changed_fields, attributes)
        SELECT usersvc_uuid7(), drafts.type, changed.id, :actor, :request_id,
               {snapshot_sql("changed")}, CAST(changed.changed_paths AS text[]),
               drafts.attributes
        FROM changed
        CROSS JOIN unnest(CAST(:event_types AS text[]), CAST(:event_attributes AS jsonb[]))
            AS drafts (type, attributes)
    )
"""  # noqa: S608 (constant column names only)
_VOID_CODES_OF_CHANGED_EMAILS = text(
    f"""
    UPDATE user_codes AS c SET void_time = now()
    FROM {_BATCH_INPUT}, users AS u
    WHERE v.email IS NOT NULL AND u.id = v.id AND u.email <> v.email
      AND c.user_id = u.id AND c.use_time IS NULL AND c.void_time IS NULL
    """  # noqa: S608 (module constants only)
)
_UPDATE_MANY = text(
    f"""
    WITH changed AS (
    UPDATE users SET
        email = coalesce(v.email, users.email),
        email_verified = CASE WHEN v.email IS NOT NULL AND v.email <> users.email
                              THEN false ELSE users.email_verified END,
        display_name = coalesce(v.display_name, users.display_name),
        roles = coalesce(CAST(v.roles AS text[]), users.roles),
        labels = coalesce(v.labels, users.labels),
        version = users.version + 1,
        update_time = now()
    FROM {_BATCH_INPUT}
    WHERE users.id = v.id
    RETURNING {_USER_COLUMNS}, v.changed AS changed_paths
    ), {_RECORD}
    SELECT * FROM changed
    """  # noqa: S608 (module constants only)
).execution_options(**WRITES_EVENTS)
_DELETE_MANY = text(
    f"""
    WITH changed AS (
        UPDATE users SET delete_time = coalesce(delete_time, now()),
                         version = version + 1, update_time = now()
        WHERE id = ANY(CAST(:user_ids AS uuid[]))
        RETURNING {_USER_COLUMNS}, '{{}}' AS changed_paths
    ), {_RECORD}
    SELECT * FROM changed
    """  # noqa: S608 (module constants only)
).execution_options(**WRITES_EVENTS)
_LIVE_SESSIONS = text(
    "SELECT id FROM sessions WHERE user_id = ANY(CAST(:user_ids AS uuid[])) AND revoke_time IS NULL"
)


class SqlAlchemyAccountRepository(SqlAlchemyRepository):
    """usersvc.domain.ports.AccountRepository on PostgreSQL. Every method
    raises DatabaseUnavailable when the database cannot be reached."""

    async def relax_commit(self) -> None:
        """The unit of work's commit will not wait for the WAL flush (a
        crash may lose it): for writes whose loss is harmless (a wrong try
        counted, a code issued), so that they cost what a read costs."""
        await self._execute(_RELAX_COMMIT)

    async def lock_users(self, user_ids: Sequence[uuid.UUID]) -> list[User]:
        """See the port."""
        result = await self._execute(_LOCK_USERS, {"user_ids": list(user_ids)})
        return [user_from_row(row) for row in result.mappings().all()]

    async def lock_active_user_by_email(self, email: str) -> uuid.UUID | None:
        """See the port."""
        result = await self._execute(_LOCK_ACTIVE_BY_EMAIL, {"email": email})
        user_id: uuid.UUID | None = result.scalar_one_or_none()
        return user_id

    async def replace_code(
        self, user_id: uuid.UUID, kind: CodeKind, code_hash: bytes, expire_time: datetime
    ) -> bool:
        """See the port."""
        await self._execute(_VOID_LIVE_CODE, {"user_id": user_id, "kind": kind.value})
        result = await self._execute(
            _INSERT_CODE,
            {
                "code_id": uuid7(),
                "user_id": user_id,
                "kind": kind.value,
                "code_hash": code_hash,
                "expire_time": expire_time,
            },
        )
        return result.first() is not None

    async def consume_code(
        self,
        kind: CodeKind,
        code_hash: bytes,
        *,
        now: datetime,
        max_attempts: int,
        user_id: uuid.UUID | None = None,
        email: str | None = None,
    ) -> uuid.UUID | None:
        """See the port."""
        if (user_id is None) == (email is None):
            raise ValueError("consume_code takes either user_id or email")
        params: dict[str, Any] = {
            "presented_hash": code_hash,
            "check_time": now,
            "max_attempts": max_attempts,
            "code_kind": kind.value,
        }
        if user_id is not None:
            stmt = _CONSUME_BY_ID
            params["code_user_id"] = user_id
        else:
            stmt = _CONSUME_BY_EMAIL
            params["code_email"] = email
        row = (await self._execute(stmt, params)).mappings().one_or_none()
        if row is None or not row["consumed"]:
            return None
        consumed_by: uuid.UUID = row["user_id"]
        return consumed_by

    async def set_email_verified(
        self, user_id: uuid.UUID, *, events: Sequence[EventDraft] = ()
    ) -> User:
        """See the port."""
        statement = with_events(_SET_EMAIL_VERIFIED, events, self._call())
        row = (await self._execute(statement, {"verified_id": user_id})).mappings().first()
        if row is None:
            raise UserNotFound(metadata={"id": str(user_id)})
        return user_from_row(row)

    async def taken_emails(
        self, emails: Sequence[str], *, except_ids: Sequence[uuid.UUID]
    ) -> set[str]:
        """See the port."""
        if not emails:
            return set()
        result = await self._execute(
            _TAKEN_EMAILS,
            {"emails": [e.lower() for e in emails], "except_ids": list(except_ids)},
        )
        return set(result.scalars().all())

    async def update_many(
        self, writes: Sequence[UserWrite], *, events: Sequence[EventDraft] = ()
    ) -> list[User]:
        """See the port."""
        if not writes:
            return []
        params = {
            **self._event_params(events),
            "changed": [_array_literal(w.changed_fields) for w in writes],
            "ids": [w.user_id for w in writes],
            "emails": [w.patch.email for w in writes],
            "display_names": [w.patch.display_name for w in writes],
            "roles": [
                None if w.patch.roles is None else _array_literal(w.patch.roles) for w in writes
            ],
            "labels": [
                None if w.patch.labels is None else json.dumps(dict(w.patch.labels)) for w in writes
            ],
        }
        await self._execute(_VOID_CODES_OF_CHANGED_EMAILS, params)
        result = await self._execute(_UPDATE_MANY, params, constraints=_EMAIL_TAKEN)
        return _in_order([w.user_id for w in writes], result.mappings().all())

    async def delete_many(
        self, user_ids: Sequence[uuid.UUID], *, events: Sequence[EventDraft] = ()
    ) -> list[User]:
        """See the port."""
        params = {**self._event_params(events), "user_ids": list(user_ids)}
        result = await self._execute(_DELETE_MANY, params)
        return _in_order(user_ids, result.mappings().all())

    def _event_params(self, events: Sequence[EventDraft]) -> dict[str, Any]:
        context = self._call()
        return {
            "actor": context.actor,
            "request_id": context.request_id,
            "event_types": [draft.type.value for draft in events],
            "event_attributes": [json.dumps(dict(draft.attributes)) for draft in events],
        }

    async def live_session_ids(self, user_ids: Sequence[uuid.UUID]) -> list[uuid.UUID]:
        """The ids of the users' sessions not yet revoked."""
        result = await self._execute(_LIVE_SESSIONS, {"user_ids": list(user_ids)})
        return list(result.scalars().all())


def _in_order(user_ids: Sequence[uuid.UUID], rows: Sequence[RowMapping]) -> list[User]:
    by_id = {row["id"]: row for row in rows}
    users: list[User] = []
    for user_id in user_ids:
        row = by_id.get(user_id)
        if row is None:
            raise UserNotFound(metadata={"id": str(user_id)})
        users.append(user_from_row(row))
    return users


def _array_literal(values: Sequence[str]) -> str:
    # Every element quoted and escaped: the literal means exactly these strings.
    quoted = (v.replace("\\", "\\\\").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'"{v}"' for v in quoted) + "}"


__all__ = ["SqlAlchemyAccountRepository"]
