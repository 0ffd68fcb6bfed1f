"""Approvals in the database: a scan that waits for a person's yes, and the decision.

A request is written with its task (task_manager.submit, one transaction: the task and its
shards are `awaiting_approval`). A decision is one transaction too: the approval row is
decided once (guarded on `decision IS NULL`, so two approvers deciding at once get one
decision), and the task with its shards moves on, `queued` for the workers or `denied`. A
request nobody decided in time is denied the same way (`expire`)."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.engine import Row

from change_feed import Change, ChangeFeed, queue_key
from db import Database
from models import TaskStatus, approvals, tasks

# The change-feed key of a new request: each process's expiry loop sleeps until the next
# pending approval is due, and a request (which may be due sooner) wakes it.
REQUESTED_KEY = "approvals"
# How a decision is recorded, and the task status it leads to (a cancelled task's approval is
# `withdrawn`, see withdraw_in).
DECISIONS = {"approved": TaskStatus.QUEUED, "denied": TaskStatus.DENIED, "expired": TaskStatus.DENIED}


class ApprovalNotFound(LookupError):
    """No pending approval for that task."""


class ApprovalDecided(RuntimeError):
    """The approval was decided already (or expired) and cannot be decided again."""


class OwnApproval(PermissionError):
    """Nobody approves or denies their own scan."""


@dataclass(frozen=True)
class ApprovalRecord:
    """An approval with what its task would run."""

    task_id: str
    engagement: str
    requested_by: str
    reasons: list[str]
    justification: str | None
    requested_at: float
    expires_at: float
    decision: str | None
    decided_by: str | None
    decided_at: float | None
    decision_reason: str | None
    kind: str
    target: str
    argv: list[str]
    pool: str


def request_in(conn: Connection, feed: ChangeFeed, task_id: str, engagement: str, owner: str, reasons: list[str],
               now: float, expires_after_s: float) -> None:
    """In the submitting transaction: the approval its new task waits for (other processes'
    expiry loops are notified; the submitter publishes REQUESTED_KEY in its own once committed)."""
    conn.execute(insert(approvals).values(
        task_id=task_id, engagement=engagement, requested_by=owner, reasons=json.dumps(reasons),
        requested_at=now, expires_at=now + expires_after_s))
    feed.notify(conn, REQUESTED_KEY)


def withdraw_in(conn: Connection, task_id: str, now: float) -> None:
    """In the transaction that cancels a task: its pending approval, if any, is withdrawn."""
    conn.execute(update(approvals).where(approvals.c.task_id == task_id, approvals.c.decision.is_(None))
                 .values(decision="withdrawn", decided_at=now, decision_reason="cancelled by its requester"))


_WITH_TASK = select(approvals, tasks.c.kind, tasks.c.target, tasks.c.argv, tasks.c.pool).join(
    tasks, tasks.c.id == approvals.c.task_id)


class ApprovalStore:
    """The approvals, by task."""

    def __init__(self, db: Database, feed: ChangeFeed) -> None:
        self._db = db
        self._feed = feed

    async def pending(self, limit: int) -> list[ApprovalRecord]:
        """Approvals not yet decided, oldest first (those past their time included, until expired)."""
        return await self._db.run(self._pending, limit)

    async def of_task(self, task_id: str) -> ApprovalRecord | None:
        return await self._db.run(self._of_task, task_id)

    async def justify(self, task_id: str, owner: str, text: str) -> bool:
        """Record what the requester says of a pending approval; False when it is not theirs or not pending."""
        return await self._db.run(self._justify, task_id, owner, text)

    async def decide(self, task_id: str, approver: str, decision: str, reason: str) -> ApprovalRecord:
        """Approve or deny (`decision`) a pending approval as `approver`, and move its task on."""
        record = await self._db.run(self._decide, task_id, approver, decision, reason, time.time())
        self._feed.publish(task_id, queue_key(record.pool))
        return record

    async def expire(self) -> tuple[list[str], float | None]:
        """Deny every pending approval past its time: the tasks it denied, and when the next
        pending one is due (None when none is pending). A read comes first: a writing
        transaction in every process each time would hold SQLite's write lock for nothing
        almost always."""
        now = time.time()
        due = await self._db.run(self._next_due)
        if due is None or due > now:
            return [], due
        denied = await self._db.run(self._expire, now)
        self._feed.publish(*denied)
        return denied, await self._db.run(self._next_due)

    def requested(self) -> AbstractContextManager[Change]:
        """An event set whenever a scan starts waiting for approval, in any process."""
        return self._feed.subscribe(REQUESTED_KEY)

    def _next_due(self) -> float | None:
        """When the first pending approval expires: the first entry of (decision, expires_at)."""
        with self._db.reading() as conn:
            return conn.execute(select(approvals.c.expires_at).where(approvals.c.decision.is_(None))
                                .order_by(approvals.c.expires_at).limit(1)).scalar()

    def _pending(self, limit: int) -> list[ApprovalRecord]:
        with self._db.reading() as conn:
            rows = conn.execute(_WITH_TASK.where(approvals.c.decision.is_(None))
                                .order_by(approvals.c.requested_at).limit(limit)).all()
        return [_record(row) for row in rows]

    def _of_task(self, task_id: str) -> ApprovalRecord | None:
        with self._db.reading() as conn:
            row = conn.execute(_WITH_TASK.where(approvals.c.task_id == task_id)).first()
        return None if row is None else _record(row)

    def _justify(self, task_id: str, owner: str, text: str) -> bool:
        mine = (approvals.c.task_id == task_id) & (approvals.c.requested_by == owner) & approvals.c.decision.is_(None)
        with self._db.writing() as conn:
            return bool(conn.execute(update(approvals).where(mine).values(justification=text)).rowcount)

    def _decide(self, task_id: str, approver: str, decision: str, reason: str, now: float) -> ApprovalRecord:
        with self._db.writing() as conn:
            row = conn.execute(_WITH_TASK.where(approvals.c.task_id == task_id).with_for_update(of=approvals)).first()
            if row is None:
                raise ApprovalNotFound(f"no scan {task_id!r} waits for approval; list_approvals shows those that do")
            record = _record(row)
            if record.decision is not None:
                raise ApprovalDecided(f"task {task_id} was {record.decision} already"
                                      + (f" by {record.decided_by}" if record.decided_by else ""))
            if record.expires_at <= now:
                _settle(conn, self._feed, record, "expired", None, now, _expired_reason(record))
                raise ApprovalDecided(f"the approval of task {task_id} expired; its requester may ask again")
            if record.requested_by == approver:
                raise OwnApproval("nobody approves or denies their own scan; another approver decides")
            _settle(conn, self._feed, record, decision, approver, now, reason)
        return _record(row, decision=decision, decided_by=approver, decided_at=now, decision_reason=reason)

    def _expire(self, now: float) -> list[str]:
        with self._db.writing() as conn:
            rows = conn.execute(_WITH_TASK.where(approvals.c.decision.is_(None), approvals.c.expires_at <= now)
                                .with_for_update(of=approvals)).all()
            for row in rows:
                record = _record(row)
                _settle(conn, self._feed, record, "expired", None, now, _expired_reason(record))
        return [row.task_id for row in rows]


def _settle(conn: Connection, feed: ChangeFeed, record: ApprovalRecord, decision: str, by: str | None, now: float,
            reason: str) -> None:
    """Record the decision, once, and move the task and its shards on from awaiting_approval."""
    conn.execute(update(approvals).where(approvals.c.task_id == record.task_id, approvals.c.decision.is_(None))
                 .values(decision=decision, decided_by=by, decided_at=now, decision_reason=reason))
    family = ((tasks.c.id == record.task_id) | (tasks.c.parent_id == record.task_id)) & (
        tasks.c.status == TaskStatus.AWAITING_APPROVAL.value)
    status = DECISIONS[decision]
    moved: Mapping[str, Any] = {"status": status.value}
    if status is TaskStatus.DENIED:
        error = f"denied by {by}: {reason}" if by else reason
        moved = {**moved, "finished_at": now, "error": error, "dedupe_key": None}
    conn.execute(update(tasks).where(family).values(**moved))
    feed.notify(conn, record.task_id, queue_key(record.pool))


def _expired_reason(record: ApprovalRecord) -> str:
    return f"no approver decided within {round(record.expires_at - record.requested_at)} s"


def _record(row: Row[Any], **decided: Any) -> ApprovalRecord:
    data = dict(row._mapping) | decided
    return ApprovalRecord(**data | {"reasons": json.loads(data["reasons"]), "argv": json.loads(data["argv"])})
