"""tasks.status holds every status: 'awaiting_approval' (17 characters, migration 0012) did not
fit VARCHAR(16), and PostgreSQL refused every scan held for approval (SQLite does not enforce
the length).

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.alter_column("status", type_=sa.String(32), existing_type=sa.String(16), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.alter_column("status", type_=sa.String(16), existing_type=sa.String(32), existing_nullable=False)
