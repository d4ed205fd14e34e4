"""Database schema as SQLAlchemy declarative models.

The models describe the tables; Alembic migrations create them (nothing calls
``create_all`` at runtime) and a test checks that the two never drift apart.
Repositories mostly run Core statements against ``UserRow.__table__`` and turn
rows into domain dataclasses, so these classes never leave the adapters.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from usersvc.domain.models import uuid7

# Explicit constraint and index names: migrations (and the autogenerate drift
# check) refer to objects by name, so the names must not depend on the order
# SQLAlchemy happens to create them in.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# The unique index that enforces case-insensitive email uniqueness; the
# repository recognises violations of it by this name.
USERS_EMAIL_INDEX = "uq_users_lower_email"


class Base(DeclarativeBase):
    metadata = metadata


class UserRow(Base):
    __tablename__ = "users"

    # Generated in Python (uuid7 is time-ordered) so a batch insert knows its
    # ids before the round trip and can restore input order from RETURNING.
    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    # Stored lower-cased by the service; uniqueness is on lower(email) so the
    # database enforces it even for a writer that forgets to normalise.
    email: Mapped[str] = mapped_column(Text, nullable=False)
    password_hash: Mapped[str] = mapped_column(Text, nullable=False)
    display_name: Mapped[str] = mapped_column(Text, nullable=False, server_default="")
    roles: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    labels: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    # Taken from the database clock (one clock for every replica).
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    update_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    disable_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    delete_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Bumped by every write; the etag is derived from it.
    version: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("1"))
    # Brute-force protection (usersvc.domain.lockout): login attempts since
    # the last success or lock, locks since the last success, and the end of
    # the current lock. Not part of the resource: writing them leaves version
    # (and so the etag) alone.
    failed_login_count: Mapped[int] = mapped_column(
        Integer, nullable=False, server_default=text("0")
    )
    lock_count: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set by VerifyEmail, cleared whenever the email changes.
    email_verified: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )

    __table_args__ = (
        # Also serves ORDER BY lower(email), id: lower(email) is unique, so the
        # id tie-breaker never has to sort more than one row per key.
        Index(USERS_EMAIL_INDEX, func.lower(email), unique=True),
        Index("ix_users_create_time_id", create_time, id),
        Index("ix_users_display_name_id", display_name, id),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint("jsonb_typeof(labels) = 'object'", name="labels_object"),
    )


class IdempotencyKeyRow(Base):
    """The first response of a request carrying a request_id (AIP-155)."""

    __tablename__ = "idempotency_keys"

    # Scope keeps keys of different callers and methods apart.
    scope: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    # Hash of the request, to refuse a key reused for a different request.
    fingerprint: Mapped[str] = mapped_column(Text, nullable=False)
    # Snapshots of the users the first request returned.
    response: Mapped[list[dict[str, Any]]] = mapped_column(JSONB, nullable=False)
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        # For expiring old keys by age.
        Index("ix_idempotency_keys_create_time", create_time),
    )


class SessionRow(Base):
    """One login; access tokens name it in their sid claim."""

    __tablename__ = "sessions"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # Absolute end, fixed at login: rotation never extends it.
    expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    last_refresh_time: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True
    )
    revoke_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # A usersvc.domain.models.RevokeReason value; free text in the schema so
    # that a new reason needs no migration.
    revoke_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The refresh token chain (usersvc.services.sessions), constant in size
    # however often the session is refreshed: the generation of the one
    # valid refresh token, the SHA-256 of its 256 random bits, and the key
    # that authenticates every generation the session ever issued (so that
    # a retired token presented again is recognised as one). Generation 0:
    # a session from before the chain, whose one token is legacy_refresh_hash.
    refresh_generation: Mapped[int] = mapped_column(
        BigInteger, nullable=False, server_default=text("0")
    )
    refresh_token_hash: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    refresh_tag_key: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    # The SHA-256 of the session's refresh token issued before the chain
    # (migration 0006): usable while refresh_generation is 0, recognised as
    # retired after. Looked up by hash, so indexed; NULL for every session
    # created since.
    legacy_refresh_hash: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    __table_args__ = (
        # Revoking a user's sessions and the cascade of a purge look rows up
        # by user; a partial index (live sessions only) would leave the
        # cascade to scan the table.
        Index("ix_sessions_user_id", user_id),
        Index("ix_sessions_expire_time", expire_time),
        Index(
            "ix_sessions_legacy_refresh_hash",
            legacy_refresh_hash,
            unique=True,
            postgresql_where=legacy_refresh_hash.is_not(None),
        ),
        CheckConstraint(
            "(revoke_time IS NULL) = (revoke_reason IS NULL)", name="revoke_reason_with_time"
        ),
        CheckConstraint("octet_length(refresh_token_hash) = 32", name="refresh_token_hash_sha256"),
        CheckConstraint("octet_length(refresh_tag_key) = 32", name="refresh_tag_key_length"),
        CheckConstraint(
            "octet_length(legacy_refresh_hash) = 32", name="legacy_refresh_hash_sha256"
        ),
    )


class SessionRevocationRow(Base):
    """The revocation log every replica loads into memory and follows with
    LISTEN. No foreign key: it must outlive a purge, which deletes the
    sessions while their access tokens are still unexpired."""

    __tablename__ = "session_revocations"

    session_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    revoke_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # After this no access token of the session can still be valid, so the
    # row may go.
    expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)

    __table_args__ = (Index("ix_session_revocations_expire_time", expire_time),)


# The partial unique index that keeps one live code per user and kind; a
# concurrent second insert waits on it instead of adding a second live code.
USER_CODES_LIVE_INDEX = "uq_user_codes_live_user_id_kind"


class UserCodeRow(Base):
    """An email verification or password reset code, stored only as its
    HMAC-SHA256 under a server key (usersvc.services.account_codes): the
    table alone lets nobody use or guess a code."""

    __tablename__ = "user_codes"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False
    )
    # A usersvc.domain.codes.CodeKind value.
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    code_hash: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    create_time: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    expire_time: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # Wrong codes presented while this one was live.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    # At most one of these is set: consumed by a success, or voided (a newer
    # code, too many wrong tries, an email change).
    use_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    void_time: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        Index(
            USER_CODES_LIVE_INDEX,
            user_id,
            kind,
            unique=True,
            postgresql_where=text("use_time IS NULL AND void_time IS NULL"),
        ),
        CheckConstraint("kind IN ('email_verification', 'password_reset')", name="kind_known"),
        CheckConstraint("octet_length(code_hash) = 32", name="code_hash_sha256"),
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
    )


# Core handles for the repositories (typed as Table, which __table__ is not).
users_table = cast(Table, UserRow.__table__)
idempotency_keys_table = cast(Table, IdempotencyKeyRow.__table__)
sessions_table = cast(Table, SessionRow.__table__)
session_revocations_table = cast(Table, SessionRevocationRow.__table__)
user_codes_table = cast(Table, UserCodeRow.__table__)


# --- events: the audit trail and transactional outbox -------------------------
# A Core table, not a mapped class: nothing reads it through the ORM. Written
# in the same transaction as each change (usersvc.adapters.events). Rows are
# inserted without a sequence; the sequencer numbers committed rows in order,
# readers see only numbered ones, and the relay publishes them to NATS.
# No foreign key to users: the trail outlives a purge.
_NUMBERED = text("sequence IS NOT NULL")
events_table = Table(
    "events",
    metadata,
    Column("id", Uuid, primary_key=True),
    Column("sequence", BigInteger, nullable=True),
    # Insertion order, which the sequencer keeps among the rows it numbers
    # together (the events of one transaction share create_time).
    Column("position", BigInteger, Identity(always=True), nullable=False),
    Column("type", Text, nullable=False),
    Column("user_id", Uuid, nullable=True),
    Column("actor", Text, nullable=False, server_default=""),
    Column("request_id", Text, nullable=False, server_default=""),
    Column("create_time", DateTime(timezone=True), nullable=False, server_default=func.now()),
    # The user after the change (the user columns, never the password hash).
    Column("user_snapshot", JSONB, nullable=True),
    Column("changed_fields", ARRAY(Text), nullable=False, server_default=text("'{}'::text[]")),
    Column("attributes", JSONB, nullable=False, server_default=text("'{}'::jsonb")),
    # The transaction that inserted the row (its top-level id): the sequencer
    # reads its queue from a floor of these up (migration 0009). NULL only on
    # rows numbered before 0009 (filling them would rewrite the table); an
    # unnumbered row needs it, which the default gives every insert.
    Column(
        "txid",
        BigInteger,
        nullable=True,
        server_default=text("(pg_current_xact_id())::text::bigint"),
    ),
    # Readers only see numbered rows, and say so (sequence IS NOT NULL): the
    # indexes serving them skip unnumbered rows, so an insert writes only the
    # heap, the primary key and ix_events_unsequenced (migration 0007).
    Index("uq_events_sequence", "sequence", unique=True, postgresql_where=_NUMBERED),
    # ListEvents filters, each in sequence order.
    Index("ix_events_user_id_sequence", "user_id", "sequence", postgresql_where=_NUMBERED),
    Index("ix_events_type_sequence", "type", "sequence", postgresql_where=_NUMBERED),
    Index("ix_events_actor_sequence", "actor", "sequence", postgresql_where=_NUMBERED),
    Index("ix_events_create_time", "create_time", postgresql_where=_NUMBERED),
    # The sequencer's queue, by inserting transaction: a pass starts at the
    # floor (event_sequencer), past the entries of the rows numbered before.
    Index(
        "ix_events_unsequenced",
        "txid",
        postgresql_where=text("sequence IS NULL"),
    ),
    CheckConstraint("jsonb_typeof(attributes) = 'object'", name="attributes_object"),
)

# The sequencer's floor (usersvc.adapters.events; migration 0009): every
# event inserted by a transaction below ``txid_floor`` is numbered. One row
# (id 1), moved by the numbering function.
event_sequencer_table = Table(
    "event_sequencer",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("txid_floor", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
)

# How far the relay has published (usersvc.adapters.nats_relay): every
# numbered event up to ``published_through`` is acknowledged by JetStream,
# none above it. One row at most (id 1); no row means nothing published.
# A mark moved once per acknowledged batch, instead of a column set on every
# event, which rewrote each row a second time (migration 0008).
event_relay_mark_table = Table(
    "event_relay_mark",
    metadata,
    Column("id", SmallInteger, primary_key=True, autoincrement=False),
    Column("published_through", BigInteger, nullable=False),
    CheckConstraint("id = 1", name="one_row"),
)
