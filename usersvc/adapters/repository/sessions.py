"""Sessions and their refresh tokens: usersvc.domain.ports.SessionRepository
on PostgreSQL, with the revocation log the replicas follow."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    DateTime,
    LargeBinary,
    Text,
    Uuid,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.engine import RowMapping

from usersvc.adapters.events import WRITES_EVENTS, snapshot_sql
from usersvc.adapters.orm import sessions_table
from usersvc.adapters.repository.base import SqlAlchemyRepository
from usersvc.adapters.revocation_channel import REVOCATION_CHANNEL, payloads
from usersvc.domain.errors import UserNotFound
from usersvc.domain.events import EventType
from usersvc.domain.models import RevokeReason, Session, uuid7
from usersvc.domain.ports import CleanupResult, RefreshChain, RefreshOutcome, RefreshStatus

sessions = sessions_table.c
# The chain starts at generation 1 (usersvc.services.sessions); 0 is a
# session from before it.
FIRST_GENERATION = 1
_SESSION_COLUMNS = (
    sessions.id,
    sessions.user_id,
    sessions.create_time,
    sessions.expire_time,
    sessions.revoke_time,
    sessions.revoke_reason,
    sessions.last_refresh_time,
)
_SESSION_USER_FK = "fk_sessions_user_id_users"

_CHAIN_COLUMNS = (sessions.refresh_generation, sessions.refresh_tag_key)

_GET_SESSION = select(*_SESSION_COLUMNS).where(sessions.id == bindparam("session_id"))
_GET_CHAIN = select(*_SESSION_COLUMNS, *_CHAIN_COLUMNS).where(
    sessions.id == bindparam("session_id")
)
# One conditional UPDATE is the single-use guarantee. Concurrent callers
# queue on the session's row lock; once the winner commits, PostgreSQL
# re-checks the WHERE for each waiter (READ COMMITTED) against the next
# generation, which then updates nothing.
# Parameter names must differ from column names in an UPDATE.
_USE_REFRESH_TOKEN = (
    update(sessions_table)
    .where(
        sessions.id == bindparam("presented_session_id", type_=Uuid()),
        sessions.refresh_generation == bindparam("presented_generation", type_=BigInteger()),
        sessions.refresh_token_hash == bindparam("presented_hash", type_=LargeBinary()),
    )
    .values(
        refresh_generation=sessions.refresh_generation + 1,
        refresh_token_hash=bindparam("successor_hash", type_=LargeBinary()),
        last_refresh_time=func.now(),
    )
    .returning(*_SESSION_COLUMNS, *_CHAIN_COLUMNS)
)
_USE_LEGACY_REFRESH_TOKEN = (
    update(sessions_table)
    .where(
        sessions.legacy_refresh_hash == bindparam("presented_hash", type_=LargeBinary()),
        sessions.refresh_generation == 0,
    )
    .values(
        refresh_generation=FIRST_GENERATION,
        refresh_token_hash=bindparam("successor_hash", type_=LargeBinary()),
        refresh_tag_key=bindparam("new_tag_key", type_=LargeBinary()),
        last_refresh_time=func.now(),
    )
    .returning(*_SESSION_COLUMNS, *_CHAIN_COLUMNS)
)
_LEGACY_TOKEN_SESSION = select(*_SESSION_COLUMNS).where(
    sessions.legacy_refresh_hash == bindparam("presented_hash", type_=LargeBinary())
)

# Revoking is one statement per target kind: end the live sessions and log
# them for the replicas, atomically. The log also takes given ids that have
# no session row (access tokens minted before sessions were stored), but not
# sessions that were already revoked (they are logged already, or were long
# enough ago that their tokens have expired).
# Each also writes one auth.session_revoked event per user whose sessions it
# ended (usersvc.adapters.events), in the same statement.
_RECORDED = f"""
    , recorded AS (
        INSERT INTO events (id, type, user_id, actor, request_id, user_snapshot, attributes)
        SELECT usersvc_uuid7(), :event_type, u.id, :actor, :request_id,
               {snapshot_sql("u")},
               jsonb_build_object('reason', :reason, 'count', CAST(count(*) AS text))
        FROM ended JOIN users AS u ON u.id = ended.user_id
        GROUP BY u.id
    )
"""  # noqa: S608 (constant column names only)
_REVOKE_SESSIONS = (
    text(
        """
    WITH ended AS (
        UPDATE sessions SET revoke_time = now(), revoke_reason = :reason
        WHERE id = ANY(CAST(:session_ids AS uuid[])) AND revoke_time IS NULL
        RETURNING id, user_id
    ), rowless AS (
        SELECT given.id FROM unnest(CAST(:session_ids AS uuid[])) AS given(id)
        WHERE NOT EXISTS (SELECT 1 FROM sessions WHERE sessions.id = given.id)
    ), logged AS (
        INSERT INTO session_revocations (session_id, expire_time)
        SELECT id, :expire_time FROM ended
        UNION
        SELECT id, :expire_time FROM rowless
        ON CONFLICT (session_id) DO NOTHING
        RETURNING session_id
    )
    -- recorded
    SELECT session_id FROM logged
    """.replace("-- recorded", _RECORDED)
    )
    .bindparams(
        bindparam("reason", type_=Text()),
        bindparam("expire_time", type_=DateTime(timezone=True)),
    )
    .execution_options(**WRITES_EVENTS)
)
_REVOKE_USER_SESSIONS = (
    text(
        """
    WITH ended AS (
        UPDATE sessions SET revoke_time = now(), revoke_reason = :reason
        WHERE user_id = :user_id AND revoke_time IS NULL
          AND id IS DISTINCT FROM CAST(:except_session_id AS uuid)
        RETURNING id, user_id
    ), logged AS (
        INSERT INTO session_revocations (session_id, expire_time)
        SELECT id, :expire_time FROM ended
        ON CONFLICT (session_id) DO NOTHING
        RETURNING session_id
    )
    -- recorded
    SELECT session_id FROM logged
    """.replace("-- recorded", _RECORDED)
    )
    .bindparams(
        bindparam("reason", type_=Text()),
        bindparam("user_id", type_=Uuid()),
        bindparam("expire_time", type_=DateTime(timezone=True)),
    )
    .execution_options(**WRITES_EVENTS)
)
_NOTIFY = text("SELECT pg_notify(:channel, :payload)")
_DELETE_EXPIRED_SESSIONS = text(
    """
    DELETE FROM sessions WHERE id IN (
        SELECT id FROM sessions WHERE expire_time < :cutoff
        ORDER BY expire_time LIMIT :limit FOR UPDATE SKIP LOCKED
    )
    """
).bindparams(bindparam("cutoff", type_=DateTime(timezone=True)))
_DELETE_EXPIRED_REVOCATIONS = text(
    """
    DELETE FROM session_revocations WHERE session_id IN (
        SELECT session_id FROM session_revocations WHERE expire_time < :cutoff
        ORDER BY expire_time LIMIT :limit FOR UPDATE SKIP LOCKED
    )
    """
).bindparams(bindparam("cutoff", type_=DateTime(timezone=True)))


def _chain_from_row(row: RowMapping) -> RefreshChain | None:
    # Before its chain started (a session from before migration 0006 not
    # yet refreshed), a session has no tag key.
    key = row["refresh_tag_key"]
    return None if key is None else RefreshChain(row["refresh_generation"], bytes(key))


def _session_from_row(row: RowMapping) -> Session:
    reason = row["revoke_reason"]
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        create_time=row["create_time"],
        expire_time=row["expire_time"],
        revoke_time=row["revoke_time"],
        revoke_reason=None if reason is None else RevokeReason(reason),
        last_refresh_time=row["last_refresh_time"],
    )


class SqlAlchemySessionRepository(SqlAlchemyRepository):
    """usersvc.domain.ports.SessionRepository on PostgreSQL. Every method
    raises DatabaseUnavailable when the database cannot be reached."""

    async def create(
        self,
        user_id: uuid.UUID,
        expire_time: datetime,
        *,
        refresh_hash: bytes,
        tag_key: bytes,
    ) -> Session:
        """A new active session at the chain's first generation. Raises
        UserNotFound when the user row does not exist (the transaction is
        then aborted: roll back)."""
        statement = (
            sessions_table.insert()
            .values(
                id=uuid7(),
                user_id=user_id,
                expire_time=expire_time,
                refresh_generation=FIRST_GENERATION,
                refresh_token_hash=refresh_hash,
                refresh_tag_key=tag_key,
            )
            .returning(*_SESSION_COLUMNS)
        )
        missing = {"id": str(user_id)}
        result = await self._execute(
            statement, constraints={_SESSION_USER_FK: lambda: UserNotFound(metadata=missing)}
        )
        return _session_from_row(result.mappings().one())

    async def use_refresh_token(
        self, session_id: uuid.UUID, generation: int, token_hash: bytes, successor_hash: bytes
    ) -> RefreshOutcome:
        """Advance the chain if the token is its valid one (OK, with the
        session and chain as they now are); RETIRED, with the chain, for an
        older generation of an existing session; UNKNOWN otherwise."""
        params = {
            "presented_session_id": session_id,
            "presented_generation": generation,
            "presented_hash": token_hash,
            "successor_hash": successor_hash,
        }
        row = (await self._execute(_USE_REFRESH_TOKEN, params)).mappings().one_or_none()
        if row is not None:
            return RefreshOutcome(RefreshStatus.OK, _session_from_row(row), _chain_from_row(row))
        row = (await self._execute(_GET_CHAIN, {"session_id": session_id})).mappings().first()
        chain = None if row is None else _chain_from_row(row)
        if row is None or chain is None or generation >= chain.generation:
            return RefreshOutcome(RefreshStatus.UNKNOWN)
        return RefreshOutcome(RefreshStatus.RETIRED, _session_from_row(row), chain)

    async def use_legacy_refresh_token(
        self, token_hash: bytes, successor_hash: bytes, tag_key: bytes
    ) -> RefreshOutcome:
        """Start the chain from a token issued before it (OK), or tell a
        used one (RETIRED) from one never issued (UNKNOWN)."""
        params = {"presented_hash": token_hash}
        row = (
            (
                await self._execute(
                    _USE_LEGACY_REFRESH_TOKEN,
                    {**params, "successor_hash": successor_hash, "new_tag_key": tag_key},
                )
            )
            .mappings()
            .one_or_none()
        )
        if row is not None:
            return RefreshOutcome(RefreshStatus.OK, _session_from_row(row), _chain_from_row(row))
        row = (await self._execute(_LEGACY_TOKEN_SESSION, params)).mappings().one_or_none()
        if row is not None:
            return RefreshOutcome(RefreshStatus.RETIRED, _session_from_row(row))
        return RefreshOutcome(RefreshStatus.UNKNOWN)

    async def refresh_chain(self, session_id: uuid.UUID) -> RefreshChain | None:
        row = (await self._execute(_GET_CHAIN, {"session_id": session_id})).mappings().first()
        return None if row is None else _chain_from_row(row)

    async def find_legacy_refresh_token(self, token_hash: bytes) -> uuid.UUID | None:
        """The session of a token from before the chain, used or not."""
        row = (
            (await self._execute(_LEGACY_TOKEN_SESSION, {"presented_hash": token_hash}))
            .mappings()
            .one_or_none()
        )
        return None if row is None else row["id"]

    async def get(self, session_id: uuid.UUID) -> Session | None:
        row = (await self._execute(_GET_SESSION, {"session_id": session_id})).mappings().first()
        return None if row is None else _session_from_row(row)

    async def revoke(
        self,
        *,
        reason: RevokeReason,
        revocation_expire_time: datetime,
        session_ids: Sequence[uuid.UUID] | None = None,
        user_id: uuid.UUID | None = None,
        except_session_id: uuid.UUID | None = None,
    ) -> list[uuid.UUID]:
        """End sessions, log them, write one auth.session_revoked event per
        user whose sessions ended (attributes reason and count) and queue a
        NOTIFY for each chunk of ids (sent by PostgreSQL at commit).
        Returns the ids newly logged. Raises ValueError unless exactly one
        of ``session_ids`` and ``user_id`` is given."""
        if (session_ids is None) == (user_id is None):
            raise ValueError("revoke takes either session_ids or user_id")
        if session_ids is not None:
            if not session_ids:
                return []
            result = await self._execute(
                _REVOKE_SESSIONS,
                {
                    "reason": reason.value,
                    "session_ids": list(dict.fromkeys(session_ids)),
                    "expire_time": revocation_expire_time,
                    **self._event_params(),
                },
            )
        else:
            result = await self._execute(
                _REVOKE_USER_SESSIONS,
                {
                    "reason": reason.value,
                    "user_id": user_id,
                    "except_session_id": except_session_id,
                    "expire_time": revocation_expire_time,
                    **self._event_params(),
                },
            )
        revoked: list[uuid.UUID] = sorted(result.scalars().all())
        for payload in payloads(revoked):
            await self._execute(_NOTIFY, {"channel": REVOCATION_CHANNEL, "payload": payload})
        return revoked

    def _event_params(self) -> dict[str, str]:
        call = self._call()
        return {
            "event_type": EventType.SESSION_REVOKED.value,
            "actor": call.actor,
            "request_id": call.request_id,
        }

    async def delete_expired(
        self, *, session_cutoff: datetime, revocation_cutoff: datetime, limit: int
    ) -> CleanupResult:
        """Delete up to ``limit`` expired sessions (their refresh chains with them)
        and up to ``limit`` expired revocation log rows, skipping rows that
        are locked (another replica cleaning up at the same moment)."""
        expired_sessions = await self._execute(
            _DELETE_EXPIRED_SESSIONS, {"cutoff": session_cutoff, "limit": limit}
        )
        expired_revocations = await self._execute(
            _DELETE_EXPIRED_REVOCATIONS, {"cutoff": revocation_cutoff, "limit": limit}
        )
        return CleanupResult(
            sessions=_rowcount(expired_sessions), revocations=_rowcount(expired_revocations)
        )


def _rowcount(result: Any) -> int:
    count = getattr(result, "rowcount", -1)
    return count if isinstance(count, int) and count >= 0 else 0
