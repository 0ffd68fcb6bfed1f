"""Alembic migrations of the task database; `task_manager.upgrade_schema` runs them at start-up."""
