"""Evidence of each nmap run: the SHA-256 and size of the XML nmap wrote, and the version and
platform of the nmap that ran (worker_store.py writes them; evidence_store.py reads them).

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

COLUMNS = (("raw_xml_sha256", sa.String(64)), ("raw_xml_size", sa.Integer()), ("nmap_version", sa.String(64)),
           ("nmap_platform", sa.String(128)))


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
