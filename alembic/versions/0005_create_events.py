"""Create events: the audit trail and transactional outbox.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06

Written by hand to match usersvc.adapters.orm; the integration tests check
that autogenerate finds no difference between the two. A statement trigger
NOTIFYs the sequencer (usersvc.adapters.events) when events are inserted: the
notification is sent at commit, so nothing can add an event without waking
it, and a rolled-back insert wakes nobody.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("sequence", sa.BigInteger(), nullable=True),
        sa.Column("position", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=True),
        sa.Column("actor", sa.Text(), server_default="", nullable=False),
        sa.Column("request_id", sa.Text(), server_default="", nullable=False),
        sa.Column(
            "create_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("user_snapshot", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "changed_fields",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.Column(
            "attributes",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "jsonb_typeof(attributes) = 'object'", name=op.f("ck_events_attributes_object")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("sequence", name=op.f("uq_events_sequence")),
    )
    op.create_index("ix_events_user_id_sequence", "events", ["user_id", "sequence"])
    op.create_index("ix_events_type_sequence", "events", ["type", "sequence"])
    op.create_index("ix_events_actor_sequence", "events", ["actor", "sequence"])
    op.create_index("ix_events_create_time", "events", ["create_time"])
    op.create_index(
        "ix_events_unsequenced",
        "events",
        ["position"],
        postgresql_where=sa.text("sequence IS NULL"),
    )
    op.create_index(
        "ix_events_unpublished",
        "events",
        ["sequence"],
        postgresql_where=sa.text("published_at IS NULL AND sequence IS NOT NULL"),
    )
    op.execute(
        """
        CREATE FUNCTION usersvc_events_inserted() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('usersvc_events_inserted', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER events_inserted AFTER INSERT ON events
        FOR EACH STATEMENT EXECUTE FUNCTION usersvc_events_inserted()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER events_inserted ON events")
    op.execute("DROP FUNCTION usersvc_events_inserted()")
    op.drop_table("events")
