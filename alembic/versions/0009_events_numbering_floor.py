"""Events: the sequencer finds its queue above a floor, not behind every event it numbered.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

Written by hand to match usersvc.adapters.orm; the integration tests check
that autogenerate finds no difference between the two.

Numbering an event makes a new version of its row; the old version, and its
entry in the queue index (ix_events_unsequenced, the rows WHERE sequence IS
NULL), stay until vacuum removes them. The queue was read from its start in
insertion order, so every pass walked the entries of all the events
numbered since the last vacuum: with a few tens of thousands of them a pass
of forty rows took 17 ms (a bitmap scan that visited each dead row), and a
large table that vacuum reaches after 20% of its rows changed would make
each pass slower than the commits it numbers.

Each row now records the transaction that inserted it (``txid``, the
top-level transaction id as a bigint, by default), and the queue index is
ordered by it. A pass that took every committed row it could see proves
that every row inserted by a transaction older than the oldest one still
running when the pass's statement began is numbered: those transactions
had ended, so their rows were visible to it, and older rows were numbered
before. A pass that numbered rows stores that oldest running id as the
floor (event_sequencer.txid_floor), and the next pass reads the queue from
there, past the dead entries below. A pass with nothing to number writes
nothing: its write would take a transaction id and so move the oldest
running one, and every idle poll would write again. The pass is one
statement after the lock: the floor's read, the numbering, the floor's
move, in one snapshot.
A transaction that started earlier and commits later has an id at or
above the floor until it ends, so it is still found; a long transaction
anywhere in the cluster holds the floor down while it runs, costing
passes time, never events.

Within a pass the order is still insertion order (``position``): a write
that waited for another's row lock inserts its event after the other's.

Rows waiting when this runs get txid 0, below any floor the sequencer will
store, so they are numbered by the first pass; the statement's lock on the
table keeps writers out until it commits, and they then get the default.

Downgrade: the queue index goes back to ``position``, the column and the
floor go, and the function is 0008's again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_UNNUMBERED = sa.text("sequence IS NULL")
_CURRENT_TXID = sa.text("(pg_current_xact_id())::text::bigint")


def upgrade() -> None:
    op.add_column("events", sa.Column("txid", sa.BigInteger(), nullable=True))
    op.execute("UPDATE events SET txid = 0 WHERE sequence IS NULL")
    op.alter_column("events", "txid", server_default=_CURRENT_TXID)
    op.drop_index("ix_events_unsequenced", table_name="events")
    op.create_index("ix_events_unsequenced", "events", ["txid"], postgresql_where=_UNNUMBERED)
    op.create_table(
        "event_sequencer",
        sa.Column("id", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("txid_floor", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("id = 1", name=op.f("ck_event_sequencer_one_row")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_sequencer")),
    )
    op.execute("INSERT INTO event_sequencer (id, txid_floor) VALUES (1, 0)")
    op.execute(_NUMBER_EVENTS)


# One pass of the sequencer (usersvc.adapters.events.sequence_pending_on):
# under the advisory lock ``lock_key`` (held until the caller's transaction
# ends), number up to ``batch`` committed, unnumbered events inserted by
# transactions at or above the floor, in insertion order, after the highest
# number; raise the floor when it took them all; announce the highest new
# number on ``channel``; return how many it numbered. The same signature as
# 0008's: replicas still running 0008's code call this one.
#
# enable_seqscan is off for the function's statements: on a table that grew
# since it was last analysed, the planner may think a sequential scan of
# every event cheaper than the queue index.
_NUMBER_EVENTS = """
    CREATE OR REPLACE FUNCTION usersvc_number_events(lock_key bigint, batch integer, channel text)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE
    SET enable_seqscan = off
    AS $$
    DECLARE
        numbered_count integer;
        highest bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock(lock_key);
        -- One statement, with a snapshot taken after the lock was granted
        -- (READ COMMITTED): it sees every row numbered before, and every
        -- transaction older than its oldest running one (pg_snapshot_xmin
        -- of its own snapshot) has ended, so their rows are visible to it.
        WITH bound AS (
            -- No floor row (emptied by hand) is a floor of 0.
            SELECT coalesce((SELECT txid_floor FROM event_sequencer WHERE id = 1), 0) AS floor,
                   pg_snapshot_xmin(pg_current_snapshot())::text::bigint AS oldest_running
        ),
        base AS (SELECT coalesce(max(sequence), 0) AS top FROM events),
        pending AS (
            SELECT ctid AS row, row_number() OVER (ORDER BY position) AS n
            FROM (
                SELECT events.ctid, events.position FROM events, bound
                WHERE events.sequence IS NULL AND events.txid >= bound.floor
                ORDER BY events.position LIMIT batch
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
        ),
        counted AS (SELECT count(*) AS numbered, max(sequence) AS highest FROM done),
        raised AS (
            -- A short batch took every row it could see: nothing below
            -- oldest_running is left to number, now or later. Only a pass
            -- that numbered rows moves it: an empty one writes nothing
            -- (its write would take a transaction id of its own, and so
            -- make the next empty pass write again), and leaves the queue
            -- no dead entries to skip.
            INSERT INTO event_sequencer (id, txid_floor)
            SELECT 1, bound.oldest_running FROM bound, counted
            WHERE counted.numbered > 0 AND counted.numbered < batch
              AND bound.oldest_running > bound.floor
            ON CONFLICT (id) DO UPDATE SET txid_floor = excluded.txid_floor
        )
        SELECT numbered, counted.highest INTO numbered_count, highest FROM counted;
        IF numbered_count > 0 THEN
            PERFORM pg_notify(channel, highest::text);
        END IF;
        RETURN numbered_count;
    END
    $$
"""

# 0008's function, for the downgrade.
_NUMBER_EVENTS_0008 = """
    CREATE OR REPLACE FUNCTION usersvc_number_events(lock_key bigint, batch integer, channel text)
    RETURNS integer
    LANGUAGE plpgsql VOLATILE AS $$
    DECLARE
        numbered_count integer;
        highest bigint;
    BEGIN
        PERFORM pg_advisory_xact_lock(lock_key);
        WITH base AS (SELECT coalesce(max(sequence), 0) AS top FROM events),
        pending AS (
            SELECT ctid AS row, row_number() OVER (ORDER BY position) AS n
            FROM (
                SELECT ctid, position FROM events WHERE sequence IS NULL
                ORDER BY position LIMIT batch
            ) AS oldest
        ),
        done AS (
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
    # The function first: 0008's does not read what goes next.
    op.execute(_NUMBER_EVENTS_0008)
    op.drop_table("event_sequencer")
    op.drop_index("ix_events_unsequenced", table_name="events")
    op.drop_column("events", "txid")
    op.create_index("ix_events_unsequenced", "events", ["position"], postgresql_where=_UNNUMBERED)
