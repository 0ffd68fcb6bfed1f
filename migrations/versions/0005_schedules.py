"""Schedules: scans run again and again, their runs, and the scheduler's lease.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("spec", sa.Text, nullable=False),
        sa.Column("every", sa.String(100), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("next_run_at", sa.Float, nullable=False),
        sa.Column("webhook_url", sa.Text),
        sa.Column("webhook_secret", sa.String(64)),
    )
    op.create_index("ix_schedules_next_run", "schedules", ["next_run_at"])
    op.create_index("ix_schedules_owner_created", "schedules", ["owner", "created_at"])
    op.create_table(
        "schedule_runs",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("schedule_id", sa.String(36), nullable=False),
        sa.Column("due_at", sa.Float, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("task_id", sa.String(36)),
        sa.Column("error", sa.Text),
        sa.Column("finished_at", sa.Float),
        sa.Column("previous_task_id", sa.String(36)),
        sa.Column("diff", sa.Text),
        sa.Column("webhook_status", sa.String(16)),
        sa.Column("webhook_attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("webhook_next_at", sa.Float),
        sa.Column("webhook_error", sa.Text),
    )
    op.create_index("ux_schedule_runs_due", "schedule_runs", ["schedule_id", "due_at"], unique=True)
    op.create_index("ix_schedule_runs_status", "schedule_runs", ["status"])
    op.create_index("ix_schedule_runs_webhook", "schedule_runs", ["webhook_status", "webhook_next_at"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(64), nullable=False),
        sa.Column("holder_name", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("leases")
    op.drop_table("schedule_runs")
    op.drop_table("schedules")
