"""People who sign in with the team's OpenID provider, and the role their claims gave them
(people_store.py): what a schedule's run or a worker's check applies to them.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "people",
        sa.Column("owner", sa.String(320), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("people")
