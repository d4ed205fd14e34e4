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
    CheckConstraint,
    DateTime,
    Index,
    MetaData,
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


# Core handles for the repositories (typed as Table, which __table__ is not).
users_table = cast(Table, UserRow.__table__)
idempotency_keys_table = cast(Table, IdempotencyKeyRow.__table__)
