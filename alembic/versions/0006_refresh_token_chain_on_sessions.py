"""Refresh tokens as a chain on the session row; drop refresh_tokens.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

Written by hand to match usersvc.adapters.orm; the integration tests check
that autogenerate finds no difference between the two.

Before: one refresh_tokens row per token ever issued, kept until the session
expired (reuse detection), so storage grew with every refresh. After: the
session row holds the chain (usersvc.services.sessions): the generation of
the one valid token, the hash of its secret and the key that authenticates
retired generations; constant per session.

Existing sessions keep working: each session's one unused token (at most
one: rotation retires the old one in the same transaction) moves to
sessions.legacy_refresh_hash at generation 0, where it is still accepted
once, rotated into the chain, and recognised as retired (ending the session)
if it is presented again. Tokens that were already retired before this
migration are no longer known: presented again they are refused
(RefreshTokenInvalid) but no longer end their session.

Downgrade: the sessions' legacy tokens that were never rotated go back to
refresh_tokens; tokens issued by the chain cannot be expressed in the old
table and stop working (their holders log in again).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "sessions",
        sa.Column(
            "refresh_generation", sa.BigInteger(), server_default=sa.text("0"), nullable=False
        ),
    )
    op.add_column("sessions", sa.Column("refresh_token_hash", sa.LargeBinary(), nullable=True))
    op.add_column("sessions", sa.Column("refresh_tag_key", sa.LargeBinary(), nullable=True))
    op.add_column("sessions", sa.Column("legacy_refresh_hash", sa.LargeBinary(), nullable=True))
    op.create_check_constraint(
        op.f("ck_sessions_refresh_token_hash_sha256"),
        "sessions",
        "octet_length(refresh_token_hash) = 32",
    )
    op.create_check_constraint(
        op.f("ck_sessions_refresh_tag_key_length"),
        "sessions",
        "octet_length(refresh_tag_key) = 32",
    )
    op.create_check_constraint(
        op.f("ck_sessions_legacy_refresh_hash_sha256"),
        "sessions",
        "octet_length(legacy_refresh_hash) = 32",
    )
    op.execute(
        """
        UPDATE sessions SET legacy_refresh_hash = unused.token_hash
        FROM (
            SELECT DISTINCT ON (session_id) session_id, token_hash
            FROM refresh_tokens WHERE use_time IS NULL
            ORDER BY session_id, create_time DESC
        ) AS unused
        WHERE sessions.id = unused.session_id
        """
    )
    op.create_index(
        op.f("ix_sessions_legacy_refresh_hash"),
        "sessions",
        ["legacy_refresh_hash"],
        unique=True,
        postgresql_where=sa.text("legacy_refresh_hash IS NOT NULL"),
    )
    op.drop_index(op.f("ix_refresh_tokens_session_id"), table_name="refresh_tokens")
    op.drop_table("refresh_tokens")


def downgrade() -> None:
    op.create_table(
        "refresh_tokens",
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column("session_id", sa.Uuid(), nullable=False),
        sa.Column(
            "create_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("use_time", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "octet_length(token_hash) = 32", name=op.f("ck_refresh_tokens_token_hash_sha256")
        ),
        sa.ForeignKeyConstraint(
            ["session_id"],
            ["sessions.id"],
            name=op.f("fk_refresh_tokens_session_id_sessions"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("token_hash", name=op.f("pk_refresh_tokens")),
    )
    op.create_index(
        op.f("ix_refresh_tokens_session_id"), "refresh_tokens", ["session_id"], unique=False
    )
    op.execute(
        """
        INSERT INTO refresh_tokens (token_hash, session_id, use_time)
        SELECT legacy_refresh_hash, id,
               CASE WHEN refresh_generation = 0 THEN NULL ELSE now() END
        FROM sessions WHERE legacy_refresh_hash IS NOT NULL
        """
    )
    op.drop_index(
        op.f("ix_sessions_legacy_refresh_hash"),
        table_name="sessions",
        postgresql_where=sa.text("legacy_refresh_hash IS NOT NULL"),
    )
    op.drop_constraint(op.f("ck_sessions_legacy_refresh_hash_sha256"), "sessions", type_="check")
    op.drop_constraint(op.f("ck_sessions_refresh_tag_key_length"), "sessions", type_="check")
    op.drop_constraint(op.f("ck_sessions_refresh_token_hash_sha256"), "sessions", type_="check")
    op.drop_column("sessions", "legacy_refresh_hash")
    op.drop_column("sessions", "refresh_tag_key")
    op.drop_column("sessions", "refresh_token_hash")
    op.drop_column("sessions", "refresh_generation")
