"""The limits' usage check reads indexes only: a token's tasks by age carry what the limits
count (parent_id, address_count, forced), and its active tasks carry parent_id.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_index("ix_tasks_owner_created", table_name="tasks")
    op.create_index("ix_tasks_owner_created", "tasks", ["owner", "created_at", "parent_id", "address_count", "forced"])
    op.drop_index("ix_tasks_owner_status_created", table_name="tasks")
    op.create_index("ix_tasks_owner_status_created", "tasks", ["owner", "status", "created_at", "parent_id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_owner_status_created", table_name="tasks")
    op.create_index("ix_tasks_owner_status_created", "tasks", ["owner", "status", "created_at"])
    op.drop_index("ix_tasks_owner_created", table_name="tasks")
    op.create_index("ix_tasks_owner_created", "tasks", ["owner", "created_at"])
