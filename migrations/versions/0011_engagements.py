"""Engagements (engagements.py): their rules, and the engagement each task and schedule
runs under.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engagements",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("rules", sa.Text, nullable=False),
        sa.Column("created_by", sa.String(320), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
    )
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("engagement", sa.String(64)))
        batch.create_index("ix_tasks_engagement_created", ["engagement", "created_at"])
    with op.batch_alter_table("schedules") as batch:
        batch.add_column(sa.Column("engagement", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("engagement")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ix_tasks_engagement_created")
        batch.drop_column("engagement")
    op.drop_table("engagements")
