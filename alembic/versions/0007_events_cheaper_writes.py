"""Events: no NOTIFY in the writing transaction; unnumbered rows skip the read indexes.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Written by hand to match usersvc.adapters.orm; the integration tests check
that autogenerate finds no difference between the two.

- The statement trigger events_inserted (0005) goes: a NOTIFY in the writing
  transaction takes PostgreSQL's global notification lock from
  PreCommit_Notify until the commit record is flushed, so every commit that
  wrote an event waited for the others' flushes. The sequencer is now woken
  after the commit (usersvc.adapters.event_wakeup), and still polls.
- The indexes that serve readers (the unique sequence, and one per ListEvents
  filter: user_id, type, actor, create_time) become partial, WHERE sequence
  IS NOT NULL. Readers only ever see numbered rows and say so in their
  queries; an insert (sequence NULL) then writes the heap, the primary key
  and ix_events_unsequenced only, and the numbering UPDATE, which makes a
  new row version anyway, adds the rest once instead of next to entries
  for the unnumbered version that only vacuum would remove.

Downgrade: the trigger and the full indexes come back as 0005 made them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_NUMBERED = sa.text("sequence IS NOT NULL")
# (name, columns) of the readers' indexes besides the unique sequence.
_READ_INDEXES = (
    ("ix_events_user_id_sequence", ["user_id", "sequence"]),
    ("ix_events_type_sequence", ["type", "sequence"]),
    ("ix_events_actor_sequence", ["actor", "sequence"]),
    ("ix_events_create_time", ["create_time"]),
)


def upgrade() -> None:
    op.execute("DROP TRIGGER events_inserted ON events")
    op.execute("DROP FUNCTION usersvc_events_inserted()")
    op.drop_constraint("uq_events_sequence", "events", type_="unique")
    op.create_index(
        "uq_events_sequence", "events", ["sequence"], unique=True, postgresql_where=_NUMBERED
    )
    for name, columns in _READ_INDEXES:
        op.drop_index(name, table_name="events")
        op.create_index(name, "events", columns, postgresql_where=_NUMBERED)


def downgrade() -> None:
    for name, columns in _READ_INDEXES:
        op.drop_index(name, table_name="events")
        op.create_index(name, "events", columns)
    op.drop_index("uq_events_sequence", table_name="events")
    op.create_unique_constraint("uq_events_sequence", "events", ["sequence"])
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
