"""The task lifecycle in the database: leases, pools, shards, dedupe, hosts, workers.

Revision ID: 0002
Revises: 0001

Liveness moves from host name and pid to a lease per task. A task left running by 0.1.0
has no lease, so the first process to start treats it as expired and resolves it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("pool", sa.String(64), nullable=False, server_default="default"))
        batch.add_column(sa.Column("worker_name", sa.String(128)))
        batch.add_column(sa.Column("claimed_at", sa.Float))
        batch.add_column(sa.Column("lease_expires_at", sa.Float))
        batch.add_column(sa.Column("dedupe_key", sa.String(64)))
        batch.add_column(sa.Column("parent_id", sa.String(36)))
        batch.add_column(sa.Column("shard_count", sa.Integer, nullable=False, server_default="0"))
        batch.drop_column("heartbeat_at")
        batch.drop_column("pid")
        batch.drop_index("ix_tasks_status_created")
        batch.create_index("ix_tasks_status_pool_created", ["status", "pool", "created_at"])
        batch.create_index("ix_tasks_owner_status_created", ["owner", "status", "created_at"])
        batch.create_index("ix_tasks_parent", ["parent_id"])
        batch.create_index("ux_tasks_dedupe_key", ["dedupe_key"], unique=True)
    op.create_table(
        "task_hosts",
        sa.Column("task_id", sa.String(36), primary_key=True),
        sa.Column("seq", sa.Integer, primary_key=True),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("pool", sa.String(64), nullable=False),
        sa.Column("capacity", sa.Integer, nullable=False),
        sa.Column("running", sa.Integer, nullable=False, server_default="0"),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_table("task_hosts")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_index("ux_tasks_dedupe_key")
        batch.drop_index("ix_tasks_parent")
        batch.drop_index("ix_tasks_owner_status_created")
        batch.drop_index("ix_tasks_status_pool_created")
        batch.create_index("ix_tasks_status_created", ["status", "created_at"])
        batch.add_column(sa.Column("pid", sa.Integer))
        batch.add_column(sa.Column("heartbeat_at", sa.Float))
        for column in ("shard_count", "parent_id", "dedupe_key", "lease_expires_at", "claimed_at", "worker_name",
                       "pool"):
            batch.drop_column(column)
