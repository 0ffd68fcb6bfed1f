"""The freshness lookup by the call's digest (issue 24): each top-level task keeps the digest
of its call (owner, kind, argv, engagement: task_manager.dedupe_key) in call_key, indexed with
status and finished_at, so finding the caller's identical completed scan reads one entry
instead of every completed task of the token. Existing top-level tasks get their digest here,
so that scans completed before the upgrade still answer identical calls. And the queue's index
carries shard_count, so that the queue's length every submit checks reads it alone rather
than every task ever.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import hashlib
import json

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

BATCH = 1000


def call_key(owner: str, kind: str, argv: str, engagement: str | None) -> str:
    """task_manager.dedupe_key as of this revision (a migration must not change with the code)."""
    called = [owner, kind, json.loads(argv)] + ([engagement] if engagement else [])
    return hashlib.sha256(json.dumps(called).encode()).hexdigest()


def upgrade() -> None:
    op.add_column("tasks", sa.Column("call_key", sa.String(64)))
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, owner, kind, argv, engagement FROM tasks WHERE parent_id IS NULL")).all()
    update = sa.text("UPDATE tasks SET call_key = :key WHERE id = :id")
    for start in range(0, len(rows), BATCH):
        conn.execute(update, [{"id": row.id, "key": call_key(row.owner, row.kind, row.argv, row.engagement)}
                              for row in rows[start:start + BATCH]])
    op.create_index("ix_tasks_fresh", "tasks", ["call_key", "status", "finished_at"])
    op.drop_index("ix_tasks_status_pool_created", table_name="tasks")
    op.create_index("ix_tasks_status_pool_created", "tasks", ["status", "pool", "created_at", "shard_count"])


def downgrade() -> None:
    op.drop_index("ix_tasks_status_pool_created", table_name="tasks")
    op.create_index("ix_tasks_status_pool_created", "tasks", ["status", "pool", "created_at"])
    op.drop_index("ix_tasks_fresh", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("call_key")
