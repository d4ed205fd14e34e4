"""Idempotency keys: usersvc.domain.ports.IdempotencyRepository on
PostgreSQL. The first response of a request id is stored as user snapshots
(never password hashes)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert as pg_insert

from usersvc.adapters.orm import idempotency_keys_table
from usersvc.adapters.repository.base import SqlAlchemyRepository
from usersvc.domain.models import User
from usersvc.domain.ports import IdempotencyKeyTaken, IdempotencyRecord

keys = idempotency_keys_table.c

# The primary key (scope, key): a request id taken by another transaction.
IDEMPOTENCY_KEY_CONSTRAINT = str(idempotency_keys_table.primary_key.name)

_GET_RECORD = select(keys.fingerprint, keys.response).where(
    keys.scope == bindparam("scope"), keys.key == bindparam("key")
)


class SqlAlchemyIdempotencyRepository(SqlAlchemyRepository):
    """usersvc.domain.ports.IdempotencyRepository on PostgreSQL. Every
    method raises DatabaseUnavailable when the database cannot be reached."""

    async def get(self, scope: str, key: str) -> IdempotencyRecord | None:
        result = await self._execute(_GET_RECORD, {"scope": scope, "key": key})
        row = result.mappings().one_or_none()
        if row is None:
            return None
        snapshots = tuple(_user_from_snapshot(item) for item in row["response"])
        return IdempotencyRecord(fingerprint=row["fingerprint"], users=snapshots)

    async def add(self, scope: str, key: str, record: IdempotencyRecord) -> None:
        """Store the first response of a request. Raises IdempotencyKeyTaken
        when another transaction stored the same (scope, key) first (waiting
        for it to commit or roll back if it is still open)."""
        statement = (
            pg_insert(idempotency_keys_table)
            .values(
                scope=scope,
                key=key,
                fingerprint=record.fingerprint,
                response=[_snapshot(user) for user in record.users],
            )
            .on_conflict_do_nothing(index_elements=[keys.scope, keys.key])
            .returning(keys.key)
        )
        if (await self._execute(statement)).first() is None:
            raise IdempotencyKeyTaken(f"request id already used in scope {scope!r}")


def _snapshot(user: User) -> dict[str, Any]:
    def iso(moment: datetime | None) -> str | None:
        return None if moment is None else moment.isoformat()

    return {
        "id": str(user.id),
        "email": user.email,
        "display_name": user.display_name,
        "roles": list(user.roles),
        "labels": dict(user.labels),
        "create_time": iso(user.create_time),
        "update_time": iso(user.update_time),
        "disable_time": iso(user.disable_time),
        "delete_time": iso(user.delete_time),
        "version": user.version,
        "email_verified": user.email_verified,
    }


def _user_from_snapshot(data: Mapping[str, Any]) -> User:
    def moment(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    return User(
        id=uuid.UUID(data["id"]),
        email=data["email"],
        display_name=data["display_name"],
        roles=tuple(data["roles"]),
        labels=dict(data["labels"]),
        create_time=datetime.fromisoformat(data["create_time"]),
        update_time=datetime.fromisoformat(data["update_time"]),
        disable_time=moment(data["disable_time"]),
        delete_time=moment(data["delete_time"]),
        version=int(data["version"]),
        email_verified=bool(data.get("email_verified", False)),
    )
