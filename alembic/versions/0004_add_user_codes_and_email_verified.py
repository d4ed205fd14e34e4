"""Add user_codes (email verification and password reset codes) and
users.email_verified.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

Written by hand to match usersvc.adapters.orm; the integration tests check
that autogenerate finds no difference between the two. The new users column
is NOT NULL with a constant default: a catalog-only change on PostgreSQL 11
and later (no table rewrite).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "users",
        sa.Column("email_verified", sa.Boolean(), server_default=sa.text("false"), nullable=False),
    )
    op.create_table(
        "user_codes",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("code_hash", sa.LargeBinary(), nullable=False),
        sa.Column(
            "create_time",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("use_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("void_time", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "kind IN ('email_verification', 'password_reset')",
            name=op.f("ck_user_codes_kind_known"),
        ),
        sa.CheckConstraint(
            "octet_length(code_hash) = 32", name=op.f("ck_user_codes_code_hash_sha256")
        ),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_user_codes_attempts_not_negative")),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_codes_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_codes")),
    )
    op.create_index(
        "uq_user_codes_live_user_id_kind",
        "user_codes",
        ["user_id", "kind"],
        unique=True,
        postgresql_where=sa.text("use_time IS NULL AND void_time IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("uq_user_codes_live_user_id_kind", table_name="user_codes")
    op.drop_table("user_codes")
    op.drop_column("users", "email_verified")
