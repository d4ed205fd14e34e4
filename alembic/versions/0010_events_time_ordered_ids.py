"""Events: time-ordered ids (UUID version 7), as users and sessions have.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-07

Written by hand; the event ids are made by the statements that write events
(usersvc.adapters.events and its neighbours), which call this function
instead of gen_random_uuid().

An event id was a random UUID (version 4), so each insert put its primary
key entry on a random leaf page of pk_events: on a large table that page is
seldom in memory, and the first change of a page after a checkpoint writes
its whole image (8 kB) to the WAL. A version 7 UUID starts with the Unix
time in milliseconds (48 bits), then the version, 74 random bits and the
variant: consecutive events land on the index's rightmost pages, as the
users' and sessions' ids (usersvc.domain.models.uuid7) already do. Ids stay
unique (74 random bits per millisecond) and are still plain UUIDs to
consumers, who de-duplicate by them (docs/events.md).

usersvc_uuid7() builds one from gen_random_uuid() (whose variant bits are
already RFC 4122's): the first 6 bytes become the time, and the version
nibble goes from 4 (0100) to 7 (0111) by setting its two low bits (bits 52
and 53 of the 128, numbered from the low bit of each byte, as set_bit
does).

Downgrade: the function goes; the code of 0009 does not call it.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION usersvc_uuid7() RETURNS uuid
        LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
            SELECT encode(
                set_bit(
                    set_bit(
                        overlay(
                            uuid_send(gen_random_uuid())
                            PLACING substring(
                                int8send((extract(epoch FROM clock_timestamp()) * 1000)::bigint)
                                FROM 3
                            )
                            FROM 1 FOR 6
                        ),
                        52, 1
                    ),
                    53, 1
                ),
                'hex'
            )::uuid
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION usersvc_uuid7()")
