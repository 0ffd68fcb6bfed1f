"""The inventory: the latest known state of every host and port, per token.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inventory_hosts",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(45), primary_key=True),
        sa.Column("address_key", sa.String(33), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("hostnames", sa.Text, nullable=False, server_default="[]"),
        sa.Column("os", sa.Text, nullable=False, server_default=""),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
        sa.Column("last_task_id", sa.String(36), nullable=False),
    )
    op.create_index("ix_inventory_hosts_owner_key", "inventory_hosts", ["owner", "address_key"])
    op.create_table(
        "inventory_ports",
        sa.Column("owner", sa.String(64), primary_key=True),
        sa.Column("address", sa.String(45), primary_key=True),
        sa.Column("protocol", sa.String(8), primary_key=True),
        sa.Column("port", sa.Integer, primary_key=True),
        sa.Column("address_key", sa.String(33), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("service", sa.String(64), nullable=False, server_default=""),
        sa.Column("product", sa.String(200), nullable=False, server_default=""),
        sa.Column("version", sa.String(200), nullable=False, server_default=""),
        sa.Column("cpe", sa.Text, nullable=False, server_default="[]"),
        sa.Column("scripts", sa.Text, nullable=False, server_default="[]"),
        sa.Column("first_seen", sa.Float, nullable=False),
        sa.Column("last_seen", sa.Float, nullable=False),
        sa.Column("changed_at", sa.Float, nullable=False),
        sa.Column("last_task_id", sa.String(36), nullable=False),
    )
    op.create_index("ix_inventory_ports_owner_port", "inventory_ports", ["owner", "port", "state"])
    op.create_index("ix_inventory_ports_owner_service", "inventory_ports", ["owner", "service"])
    op.create_index("ix_inventory_ports_owner_key", "inventory_ports", ["owner", "address_key"])


def downgrade() -> None:
    op.drop_table("inventory_ports")
    op.drop_table("inventory_hosts")
