"""A completed scan is folded into the inventory after its verdict, in short transactions of a
few hundred hosts read from its stored chunks (issue 24): the verdict marks the task pending
(tasks.fold_order, its place among its owner's pending folds), each batch moves its cursor
(fold_after) and extends the lease of the process folding it (fold_lease), past which any
process takes the fold over.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

_PENDING = sa.text("fold_order IS NOT NULL")


def upgrade() -> None:
    op.add_column("tasks", sa.Column("fold_order", sa.BigInteger))
    op.add_column("tasks", sa.Column("fold_after", sa.String(45)))
    op.add_column("tasks", sa.Column("fold_lease", sa.Float))
    op.create_index("ix_tasks_pending_folds", "tasks", ["owner", "fold_order"],
                    sqlite_where=_PENDING, postgresql_where=_PENDING)
    op.create_index("ix_result_chunks_task_key", "result_chunks", ["task_id", "last_key"])


def downgrade() -> None:
    op.drop_index("ix_result_chunks_task_key", table_name="result_chunks")
    op.drop_index("ix_tasks_pending_folds", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        for column in ("fold_lease", "fold_after", "fold_order"):
            batch.drop_column(column)
