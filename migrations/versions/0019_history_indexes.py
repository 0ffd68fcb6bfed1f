"""History at scale (issue 24): the inventory's queries and the overview's schedules read
indexes that match them, so their cost follows what they find rather than what is stored.

- find_hosts(changed_since) finds the changed hosts and ports by (owner, changed_at), where it
  read every host and port of the owner (601 ms at 100k hosts on SQLite); seen_since reads
  (owner, last_seen).
- Each top_values field reads one index alone: the port's (owner, port, state, protocol), the
  service's (owner, service, state, address), the product's and version's (owner, product,
  version, state, address), the host's (owner, status) and (owner, os).
- A schedule's latest change is the newest entry of a partial index of the runs that found
  one: the overview read every run of a schedule that had found none.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

NEW = {
    "ix_inventory_hosts_owner_changed": ("inventory_hosts", ["owner", "changed_at", "address"]),
    "ix_inventory_hosts_owner_seen": ("inventory_hosts", ["owner", "last_seen"]),
    "ix_inventory_hosts_owner_status": ("inventory_hosts", ["owner", "status"]),
    "ix_inventory_hosts_owner_os": ("inventory_hosts", ["owner", "os"]),
    "ix_inventory_ports_owner_product": ("inventory_ports", ["owner", "product", "version", "state", "address"]),
    "ix_inventory_ports_owner_changed": ("inventory_ports", ["owner", "changed_at", "address"]),
    "ix_inventory_ports_owner_seen": ("inventory_ports", ["owner", "last_seen"]),
}
# Widened: (before, after).
WIDENED = {
    "ix_inventory_ports_owner_port": (["owner", "port", "state"], ["owner", "port", "state", "protocol"]),
    "ix_inventory_ports_owner_service": (["owner", "service"], ["owner", "service", "state", "address"]),
}
CHANGES = sa.text("diff IS NOT NULL")


def upgrade() -> None:
    for name, (table, columns) in NEW.items():
        op.create_index(name, table, columns)
    for name, (_, columns) in WIDENED.items():
        op.drop_index(name, table_name="inventory_ports")
        op.create_index(name, "inventory_ports", columns)
    op.create_index("ix_schedule_runs_changes", "schedule_runs", ["schedule_id", "due_at"],
                    sqlite_where=CHANGES, postgresql_where=CHANGES)


def downgrade() -> None:
    op.drop_index("ix_schedule_runs_changes", table_name="schedule_runs")
    for name, (columns, _) in WIDENED.items():
        op.drop_index(name, table_name="inventory_ports")
        op.create_index(name, "inventory_ports", columns)
    for name, (table, _) in NEW.items():
        op.drop_index(name, table_name=table)
