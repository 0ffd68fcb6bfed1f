"""A token's concurrency counts its nmap runs (a task, or each shard of a sharded one), so its
active tasks' index carries shard_count: the count at every submit still reads the index alone.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_tasks_owner_status_created", table_name="tasks")
    op.create_index("ix_tasks_owner_status_created", "tasks",
                    ["owner", "status", "created_at", "parent_id", "shard_count"])


def downgrade() -> None:
    op.drop_index("ix_tasks_owner_status_created", table_name="tasks")
    op.create_index("ix_tasks_owner_status_created", "tasks", ["owner", "status", "created_at", "parent_id"])
