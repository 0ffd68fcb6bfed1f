"""The inventory keeps what only some scans look at: a port's extra info, and when and by which
task its version, its scripts and a host's OS were last confirmed. Rows written before hold a
product, version, CPE, scripts or OS only because a scan looked: they count as confirmed by the
task that last reported them.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_PORT_CONFIRMATIONS = {"version": "product <> '' OR version <> '' OR cpe <> '[]'", "scripts": "scripts <> '[]'"}


def upgrade() -> None:
    with op.batch_alter_table("inventory_hosts") as hosts:
        hosts.add_column(sa.Column("os_confirmed_at", sa.Float))
        hosts.add_column(sa.Column("os_task_id", sa.String(36)))
    with op.batch_alter_table("inventory_ports") as ports:
        ports.add_column(sa.Column("extrainfo", sa.String(200), nullable=False, server_default=""))
        for name in _PORT_CONFIRMATIONS:
            ports.add_column(sa.Column(f"{name}_confirmed_at", sa.Float))
            ports.add_column(sa.Column(f"{name}_task_id", sa.String(36)))
    op.execute("UPDATE inventory_hosts SET os_confirmed_at = last_seen, os_task_id = last_task_id WHERE os <> ''")
    for name, known in _PORT_CONFIRMATIONS.items():
        op.execute(f"UPDATE inventory_ports SET {name}_confirmed_at = last_seen, {name}_task_id = last_task_id "
                   f"WHERE {known}")


def downgrade() -> None:
    with op.batch_alter_table("inventory_ports") as ports:
        for name in ("extrainfo", "version_confirmed_at", "version_task_id", "scripts_confirmed_at",
                     "scripts_task_id"):
            ports.drop_column(name)
    with op.batch_alter_table("inventory_hosts") as hosts:
        hosts.drop_column("os_task_id")
        hosts.drop_column("os_confirmed_at")
