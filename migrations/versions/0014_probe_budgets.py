"""Probe budgets (issue 23): each task's probes (addresses x ports per address), and each
token's probes per minute of usage, which probes_per_day sums; the index the usage check reads
carries them too. Tasks from before count 0 probes. And the index plan_scan's estimate reads:
the fleet's finished scans of a kind in a pool, newest first.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("probe_count", sa.BigInteger, nullable=False, server_default="0"))
    op.add_column("usage_minutes", sa.Column("probes", sa.BigInteger, nullable=False, server_default="0"))
    op.drop_index("ix_tasks_owner_created", table_name="tasks")
    op.create_index("ix_tasks_owner_created", "tasks",
                    ["owner", "created_at", "parent_id", "address_count", "forced", "probe_count"])
    op.create_index("ix_tasks_history", "tasks",
                    ["kind", "pool", "status", "finished_at", "parent_id", "started_at", "probe_count"])


def downgrade() -> None:
    op.drop_index("ix_tasks_history", table_name="tasks")
    op.drop_index("ix_tasks_owner_created", table_name="tasks")
    op.create_index("ix_tasks_owner_created", "tasks", ["owner", "created_at", "parent_id", "address_count", "forced"])
    with op.batch_alter_table("usage_minutes") as batch:
        batch.drop_column("probes")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("probe_count")
