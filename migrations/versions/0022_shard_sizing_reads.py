"""Shard sizing's reads (issue 24 point 5): a scan is sized from the pool's recent nmap runs
(task_manager.RUN_HISTORY: scans run whole and shards, not a sharded scan's parent, told
apart by shard_count) and from the pool's workers that take any owner's scans (a --stdio
process's worker takes only its caller's: workers.owner), each read from one index alone.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None

# Widened: (table, before, after).
WIDENED = {
    "ix_tasks_history": ("tasks", ["kind", "pool", "status", "finished_at", "parent_id", "started_at", "probe_count"],
                         ["kind", "pool", "status", "finished_at", "parent_id", "started_at", "probe_count",
                          "shard_count"]),
    "ix_workers_pool_heartbeat": ("workers", ["pool", "heartbeat_at", "capacity", "running"],
                                  ["pool", "heartbeat_at", "capacity", "running", "owner"]),
}


def upgrade() -> None:
    op.add_column("workers", sa.Column("owner", sa.String(64)))
    for name, (table, _, columns) in WIDENED.items():
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name, (table, columns, _) in WIDENED.items():
        op.drop_index(name, table_name=table)
        op.create_index(name, table, columns)
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("owner")
