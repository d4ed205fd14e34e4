"""Add the login lockout columns to users.

Revision ID: 0003
Revises: 0002
Create Date: 2025-11-23

Written by hand to match usersvc.adapters.orm; the integration tests check
that autogenerate finds no difference between the two. Adding a NOT NULL
column with a constant default only touches the catalog on PostgreSQL 11 and
later (no table rewrite), so this is safe on a large, serving table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "users",
        sa.Column("failed_login_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column(
        "users",
        sa.Column("lock_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
    )
    op.add_column("users", sa.Column("locked_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column("users", "locked_until")
    op.drop_column("users", "lock_count")
    op.drop_column("users", "failed_login_count")
