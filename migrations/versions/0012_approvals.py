"""Approvals (approvals.py): scans an engagement says a person must approve first.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "approvals",
        sa.Column("task_id", sa.String(36), primary_key=True),
        sa.Column("engagement", sa.String(64), nullable=False),
        sa.Column("requested_by", sa.String(320), nullable=False),
        sa.Column("reasons", sa.Text, nullable=False),
        sa.Column("justification", sa.Text),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("decision", sa.String(16)),
        sa.Column("decided_by", sa.String(320)),
        sa.Column("decided_at", sa.Float),
        sa.Column("decision_reason", sa.Text),
    )
    op.create_index("ix_approvals_pending", "approvals", ["decision", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_approvals_pending", "approvals")
    op.drop_table("approvals")
