"""The evidence of tasks, read-only: for one task, or every task a filter chooses, what ran
(the exact argv, pool, worker, nmap), when, and the hashes of what it produced; and, for an
export (evidence.py), the stored result and nmap's XML themselves.

A task's runs are itself, or for a sharded task its shards (read in the same connection), in
the order get_task_result's xml joins their reports.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, overload

from sqlalchemy import ColumnElement, Connection, select
from sqlalchemy.engine import make_url

from db import Database, create_db_engine
from models import ApprovalEvidence, RunEvidence, ScanKind, TaskEvidence, TaskStatus, approvals, engagements, tasks
from result_store import read_whole, report_bytes, whole_json
from task_manager import TaskNotFound

_RUN_COLUMNS = [tasks.c[name] for name in (
    "id", "owner", "kind", "status", "target", "argv", "pool", "worker_id", "worker_name", "nmap_version",
    "nmap_platform", "created_at", "started_at", "finished_at", "raw_xml_sha256", "raw_xml_size")]


@dataclass(frozen=True)
class EvidenceFilter:
    """Which top-level tasks an export holds: those that meet every condition given (none
    given: every task). Times are Unix seconds of the tasks' creation, `until` excluded."""

    task_ids: tuple[str, ...] = ()
    owner: str | None = None
    since: float | None = None
    until: float | None = None
    engagement: str | None = None

    def described(self) -> dict[str, Any]:
        """The conditions given, as a manifest names them (times in UTC, ISO 8601)."""
        shown: dict[str, Any] = {"task_ids": sorted(self.task_ids), "owner": self.owner,
                                 "since": utc(self.since), "until": utc(self.until), "engagement": self.engagement}
        return {name: value for name, value in shown.items() if value}


@dataclass(frozen=True)
class TaskBundle:
    """A task's evidence with what it cites: its stored result (JSON) and each run's XML, by run id."""

    evidence: TaskEvidence
    result: bytes | None
    raw_xml: dict[str, bytes] = field(default_factory=dict)


class NoDatabase(LookupError):
    """The SQLite file named holds no database (an export creates none)."""


@contextlib.contextmanager
def opened(url: str, timeout_s: float) -> Iterator[EvidenceStore]:
    """An evidence store of its own on the database at `url`, for a command that reads it
    and exits; the schema is taken as it is (a server of this version has made it so)."""
    database = make_url(url).database if url.startswith("sqlite") else None
    if database and database != ":memory:" and not Path(database).exists():
        raise NoDatabase(f"no task database at {database}")
    db = Database(create_db_engine(url, timeout_s), timeout_s=timeout_s)
    try:
        yield EvidenceStore(db)
    finally:
        db.close()


class EvidenceStore:
    """Reads of tasks as evidence; it writes nothing."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def task(self, task_id: str, owner: str) -> TaskEvidence:
        """The owner's task's evidence; TaskNotFound for a missing id and another owner's alike."""
        return (await self._db.run(self._read, task_id, owner, False)).evidence

    async def bundle(self, task_id: str) -> TaskBundle:
        """Any owner's task with its result and nmap's XML (parsing nothing): for an export."""
        return await self._db.run(self._read, task_id, None, True, deadline=False)

    async def matching(self, chosen: EvidenceFilter) -> list[str]:
        """The ids of the top-level tasks `chosen` names, oldest first."""
        return await self._db.run(self._select_matching, chosen)

    def _read(self, task_id: str, owner: str | None, with_raw: bool) -> TaskBundle:
        mine = (tasks.c.id == task_id) & tasks.c.parent_id.is_(None)
        if owner is not None:
            mine &= tasks.c.owner == owner
        with self._db.reading() as conn:
            row = conn.execute(select(*_RUN_COLUMNS, tasks.c.shard_count, tasks.c.engagement).where(mine)).first()
            if row is None:
                raise TaskNotFound(f"no task {task_id!r}")
            shards = _shard_rows(conn, task_id) if row.shard_count else []
            approval = conn.execute(select(approvals).where(approvals.c.task_id == task_id)).first()
            stored = read_whole(conn, task_id)
            runs = shards or [row]
            reports = {run.id: report_bytes(conn, run.id) for run in runs} if with_raw else {}
        # The result's JSON is hashed a chunk at a time, and kept (once) only for an export.
        digest, result = None, None
        if stored is not None:
            sha256, kept = hashlib.sha256(), []
            for piece in whole_json(stored):
                sha256.update(piece)
                if with_raw:
                    kept.append(piece)
            digest, result = sha256.hexdigest(), b"".join(kept) if with_raw else None
        return TaskBundle(
            evidence=TaskEvidence(task_id=row.id, owner=row.owner, kind=ScanKind(row.kind),
                                  status=TaskStatus(row.status), target=row.target, created_at=utc(row.created_at),
                                  result_sha256=digest,
                                  runs=[_run(run._mapping) for run in runs], engagement=row.engagement,
                                  approval=None if approval is None else _approval(approval._mapping)),
            result=result,
            raw_xml={run_id: report for run_id, report in reports.items() if report is not None},
        )

    async def engagement(self, name: str) -> dict[str, Any] | None:
        """An engagement as stored (its rules as the server checked them), for an export of it."""
        return await self._db.run(self._select_engagement, name)

    def _select_engagement(self, name: str) -> dict[str, Any] | None:
        with self._db.reading() as conn:
            row = conn.execute(select(engagements).where(engagements.c.name == name)).first()
        if row is None:
            return None
        return {"name": row.name, "rules": json.loads(row.rules), "created_by": row.created_by,
                "created_at": utc(row.created_at), "source": row.source}

    def _select_matching(self, chosen: EvidenceFilter) -> list[str]:
        query = select(tasks.c.id).where(tasks.c.parent_id.is_(None), *_conditions(chosen))
        with self._db.reading() as conn:
            return list(conn.execute(query.order_by(tasks.c.created_at, tasks.c.id)).scalars())


def _conditions(chosen: EvidenceFilter) -> list[ColumnElement[bool]]:
    """The filter's conditions; a new way to choose tasks is one more here."""
    conditions: list[ColumnElement[bool]] = []
    if chosen.task_ids:
        conditions.append(tasks.c.id.in_(chosen.task_ids))
    if chosen.owner is not None:
        conditions.append(tasks.c.owner == chosen.owner)
    if chosen.since is not None:
        conditions.append(tasks.c.created_at >= chosen.since)
    if chosen.until is not None:
        conditions.append(tasks.c.created_at < chosen.until)
    if chosen.engagement is not None:
        conditions.append(tasks.c.engagement == chosen.engagement)
    return conditions


def _shard_rows(conn: Connection, parent_id: str) -> list[Any]:
    """A sharded task's shards, in the order get_task_result's xml joins their reports."""
    return list(conn.execute(select(*_RUN_COLUMNS).where(tasks.c.parent_id == parent_id)
                             .order_by(tasks.c.created_at)).all())


def _run(row: Mapping[str, Any]) -> RunEvidence:
    return RunEvidence(
        task_id=row["id"], status=TaskStatus(row["status"]), target=row["target"], argv=json.loads(row["argv"]),
        pool=row["pool"], worker=row["worker_name"], worker_id=row["worker_id"], nmap_version=row["nmap_version"],
        nmap_platform=row["nmap_platform"], started_at=utc(row["started_at"]), finished_at=utc(row["finished_at"]),
        started_at_epoch=row["started_at"], finished_at_epoch=row["finished_at"],
        raw_xml_sha256=row["raw_xml_sha256"], raw_xml_bytes=row["raw_xml_size"],
    )


@overload
def utc(epoch: float) -> str: ...


@overload
def utc(epoch: float | None) -> str | None: ...


def utc(epoch: float | None) -> str | None:
    """Unix seconds as UTC in ISO 8601 (microseconds, +00:00); None stays None."""
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC).isoformat(timespec="microseconds")


def _approval(row: Mapping[Any, Any]) -> ApprovalEvidence:
    return ApprovalEvidence(decision=row["decision"], decided_by=row["decided_by"], decided_at=utc(row["decided_at"]),
                            decision_reason=row["decision_reason"], reasons=json.loads(row["reasons"]),
                            justification=row["justification"])
