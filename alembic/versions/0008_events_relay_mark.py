"""Events: the relay's progress is a mark; numbering is one statement.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

Written by hand to match usersvc.adapters.orm; the integration tests check
that autogenerate finds no difference between the two.

The relay publishes in sequence order and the sequencer leaves no gaps, so
"published" is a prefix of the numbered events: one number says it. Setting
events.published_at after each PubAck rewrote every row a second time (a
new version with all its index entries, the snapshot copied again); the
relay now moves event_relay_mark.published_through once per acknowledged
batch. ix_events_unpublished, whose entries the numbering UPDATE wrote for
every event, goes with the column.

The sequencer's pass becomes one function, usersvc_number_events: called
as a single statement outside an explicit transaction, it costs one round
trip instead of four (BEGIN, the lock, the numbering UPDATE, COMMIT), which
was most of a pass's cost when a pass numbers a few rows. The lock is
still taken before the UPDATE's snapshot: a VOLATILE PL/pgSQL function
takes a new snapshot for each statement it runs (READ COMMITTED).

Upgrade: the mark starts just below the lowest numbered event not published
(or at the highest number when all are), so nothing published is sent again
and nothing waiting is skipped. Downgrade: the column and its index come
back, with every numbered event up to the mark published "now"; the
function goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "event_relay_mark",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("published_through", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_event_relay_mark_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_relay_mark")),
    )
    op.execute(
        """
        INSERT INTO event_relay_mark (id, published_through)
        SELECT 1, coalesce(
            (SELECT min(sequence) - 1 FROM events
             WHERE sequence IS NOT NULL AND published_at IS NULL),
            (SELECT max(sequence) FROM events WHERE published_at IS NOT NULL),
            0)
        """
    )
    op.drop_index("ix_events_unpublished", table_name="events")
    op.drop_column("events", "published_at")
    op.execute(_NUMBER_EVENTS)


# One pass of the sequencer (usersvc.adapters.events.sequence_pending_on):
# under the advisory lock ``lock_key`` (held until the caller's transaction
# ends), number up to ``batch`` committed, unnumbered events after the
# highest number, in insertion order, announce the highest new number on
# ``channel``, and return how many it numbered.
_NUMBER_EVENTS = """
    CREATE FUNCTION usersvc_number_events(lock_key bigint, batch integer, channel text)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        numbered_count integer;
        highest bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock(lock_key);
        -- A snapshot taken after the lock was granted: it sees every row
        -- numbered by the sequencer before us.
        WITH base AS (SELECT coalesce(max(sequence), 0) AS top FROM events),
        pending AS (
            SELECT ctid AS row, row_number() OVER (ORDER BY position) AS n
            FROM (
                SELECT ctid, position FROM events WHERE sequence IS NULL
                ORDER BY position LIMIT batch
            ) AS oldest
        ),
        done AS (
            -- By row address (a TID scan), not through the primary key:
            -- only the sequencer, holding the lock, changes unnumbered
            -- rows, so the rows just read stay where they are.
            UPDATE events SET sequence = base.top + pending.n
            FROM pending, base
            WHERE events.ctid = pending.row
            RETURNING events.sequence
        )
        SELECT count(*), max(done.sequence) INTO numbered_count, highest FROM done;
        IF numbered_count > 0 THEN
            PERFORM pg_notify(channel, highest::text);
        END IF;
        RETURN numbered_count;
    END
    $$
"""


def downgrade() -> None:
    op.add_column("events", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        """
        UPDATE events SET published_at = now()
        WHERE sequence <= (SELECT published_through FROM event_relay_mark WHERE id = 1)
        """
    )
    op.create_index(
        "ix_events_unpublished",
        "events",
        ["sequence"],
        postgresql_where=sa.text("published_at IS NULL AND sequence IS NOT NULL"),
    )
    op.drop_table("event_relay_mark")
    op.execute("DROP FUNCTION usersvc_number_events(bigint, integer, text)")
