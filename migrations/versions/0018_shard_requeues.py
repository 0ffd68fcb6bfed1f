"""Shards that pay for themselves (issue 24): a shard whose worker died mid-scan is queued
again for another worker of its pool, a bounded number of times (tasks.requeues); and a pool's
live workers and slots, which size a scan's shards at submit, are read from one index.

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("requeues", sa.Integer, nullable=False, server_default="0"))
    op.create_index("ix_workers_pool_heartbeat", "workers", ["pool", "heartbeat_at", "capacity", "running"])


def downgrade() -> None:
    op.drop_index("ix_workers_pool_heartbeat", table_name="workers")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("requeues")
