"""Alembic environment: migrations always run on a connection the service hands in."""

from __future__ import annotations

from alembic import context

from models import metadata

connection = context.config.attributes["connection"]
# Batch mode lets SQLite, which cannot alter most of a table in place, copy it instead.
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
