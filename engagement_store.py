"""Engagements in the database, shared by every process: the API checks a scan against its
engagement's rules, a worker and the scheduler read the same rules. Those of the config are
written at each start (config wins for its names); those made with a tool are kept."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from pydantic import ValidationError
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from db import Database, upsert
from engagements import Engagement, EngagementRules
from models import engagements

logger = logging.getLogger(__name__)


class EngagementExists(ValueError):
    """An engagement of that name exists already."""


class EngagementNotFound(LookupError):
    """No engagement has that name."""


class EngagementStore:
    """The engagements, by name."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def load_config(self, configured: Mapping[str, EngagementRules]) -> None:
        """Make the stored engagements of the config exactly `configured`: each written as
        the config has it, and those the config no longer names removed."""
        await self._db.run(self._load_config, dict(configured))

    async def get(self, name: str) -> Engagement:
        """The engagement `name`; EngagementNotFound when there is none."""
        found = await self._db.run(self._select, name)
        if found is None:
            raise EngagementNotFound(f"there is no engagement {name!r}; list_engagements names those you may use")
        return found

    async def all(self) -> list[Engagement]:
        """Every engagement, by name."""
        return await self._db.run(self._select_all)

    async def create(self, name: str, rules: EngagementRules, created_by: str) -> Engagement:
        """Store a new engagement; EngagementExists when the name is taken."""
        engagement = Engagement(name, rules, created_by, time.time(), "tool")
        try:
            await self._db.run(self._insert, engagement)
        except IntegrityError as e:
            raise EngagementExists(f"an engagement named {name!r} exists already; choose another name") from e
        return engagement

    def _load_config(self, configured: dict[str, EngagementRules]) -> None:
        now = time.time()
        with self._db.writing() as conn:
            stale = engagements.c.source == "config"
            if configured:
                stale &= engagements.c.name.not_in(list(configured))
            conn.execute(delete(engagements).where(stale))
            if configured:
                conn.execute(upsert(self._db.dialect, engagements), [
                    _row(Engagement(name, rules, "config", now, "config")) for name, rules in configured.items()])

    def _select(self, name: str) -> Engagement | None:
        with self._db.reading() as conn:
            row = conn.execute(select(engagements).where(engagements.c.name == name)).first()
        return None if row is None else _engagement(row)

    def _select_all(self) -> list[Engagement]:
        with self._db.reading() as conn:
            rows = conn.execute(select(engagements).order_by(engagements.c.name)).all()
        return [found for found in map(_engagement, rows) if found is not None]

    def _insert(self, engagement: Engagement) -> None:
        with self._db.writing() as conn:
            conn.execute(insert(engagements).values(**_row(engagement)))


def _row(engagement: Engagement) -> dict[str, object]:
    return {"name": engagement.name, "rules": engagement.rules.model_dump_json(exclude_defaults=True),
            "created_by": engagement.created_by, "created_at": engagement.created_at, "source": engagement.source}


def _engagement(row: Row[object]) -> Engagement | None:
    """The engagement of a row; None, logged, when its rules are not rules this server would
    have written (the database is no trust boundary: no scan runs under unreadable rules)."""
    try:
        rules = EngagementRules.model_validate_json(row.rules)
    except ValidationError:
        logger.error("engagement %r: its stored rules are unreadable; it is treated as missing", row.name[:64])
        return None
    return Engagement(row.name, rules, row.created_by, row.created_at, row.source)
