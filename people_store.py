"""The people who signed in (oauth.py), each with the role their provider's claims last gave
them. A scan that runs for a person without a request of theirs in this process (a schedule's
run, a worker's check of a claimed task) applies that role; a person the provider's claims put
in no role is forgotten, so their schedules stop finding a grant."""

from __future__ import annotations

from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from db import Database
from models import people


class PeopleStore:
    """Person (by email) -> role, shared by every process of the service."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, owner: str, name: str, role: str) -> None:
        await self._db.run(self._record, owner, name, role)

    async def forget(self, owner: str) -> None:
        await self._db.run(self._forget, owner)

    async def role_of(self, owner: str) -> str | None:
        return await self._db.run(self._role_of, owner)

    async def members(self, role: str) -> list[str]:
        """The people in `role`, by email."""
        return await self._db.run(self._members, role)

    def _record(self, owner: str, name: str, role: str) -> None:
        values = {"name": name[:200], "role": role}
        try:
            with self._db.writing() as conn:
                if not conn.execute(update(people).where(people.c.owner == owner).values(**values)).rowcount:
                    conn.execute(insert(people).values(owner=owner, **values))
        except IntegrityError:
            # Another process recorded the same person at the same moment: its row is there now.
            with self._db.writing() as conn:
                conn.execute(update(people).where(people.c.owner == owner).values(**values))

    def _forget(self, owner: str) -> None:
        with self._db.writing() as conn:
            conn.execute(delete(people).where(people.c.owner == owner))

    def _members(self, role: str) -> list[str]:
        with self._db.reading() as conn:
            return list(conn.execute(select(people.c.owner).where(people.c.role == role)).scalars())

    def _role_of(self, owner: str) -> str | None:
        with self._db.reading() as conn:
            return conn.execute(select(people.c.role).where(people.c.owner == owner)).scalar_one_or_none()
