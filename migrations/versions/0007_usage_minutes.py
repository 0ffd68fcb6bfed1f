"""The limits' usage per token and minute, so that a submit no longer reads every task of
the last day: the table, filled from the tasks of the last day.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import time
from collections import Counter

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    usage = op.create_table(
        "usage_minutes",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("minute", sa.Integer, primary_key=True),
        sa.Column("scans", sa.Integer, nullable=False),
        sa.Column("addresses", sa.BigInteger, nullable=False),
        sa.Column("rescans", sa.Integer, nullable=False),
        sqlite_with_rowid=False,
    )
    tasks = sa.table("tasks", sa.column("owner"), sa.column("created_at"), sa.column("parent_id"),
                     sa.column("address_count"), sa.column("forced"))
    day = op.get_bind().execute(
        sa.select(tasks.c.owner, tasks.c.created_at, tasks.c.address_count, tasks.c.forced)
        .where(tasks.c.parent_id.is_(None), tasks.c.created_at > time.time() - 86_400)).all()
    scans: Counter[tuple[str, int]] = Counter()
    addresses: Counter[tuple[str, int]] = Counter()
    rescans: Counter[tuple[str, int]] = Counter()
    for owner, created_at, address_count, forced in day:
        key = (owner, int(created_at // 60))
        scans[key] += 1
        addresses[key] += address_count
        rescans[key] += bool(forced)
    if scans:
        op.bulk_insert(usage, [{"owner": owner, "minute": minute, "scans": count, "addresses": addresses[owner, minute],
                                "rescans": rescans[owner, minute]} for (owner, minute), count in scans.items()])


def downgrade() -> None:
    op.drop_table("usage_minutes")
