"""The schedules' rows: schedules, their runs, their webhooks' delivery, and the lease that lets
one process at a time do the scheduler's work (schedules.py decides; these statements read
and write)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from change_feed import ChangeFeed
from db import SCHEDULE_LOCK, Database
from models import ACTIVE_STATUSES, ScanKind, leases, schedule_runs, schedules, tasks

# The change-feed key of the schedules: a new one wakes the process holding the scheduler lease.
SCHEDULES_KEY = "schedules"
# Run states in which a schedule's run is still going: fired, and its scan not yet finished.
RUNS_GOING = ("pending", "submitted")
_OWNER: BindParameter[str] = bindparam("p_owner")
_TAKE_SCHEDULE_LOCK = select(func.pg_advisory_xact_lock(SCHEDULE_LOCK, func.hashtext(_OWNER)))


class ScheduleNotFound(LookupError):
    """No schedule with that id belongs to the caller."""


class TooManySchedules(RuntimeError):
    """The owner already has as many schedules as its limit allows."""


class RunAlreadyQueued(RuntimeError):
    """A schedule's run already has its task (queued by another process), or was deleted."""


@dataclass(frozen=True)
class ScheduleRecord:
    """One row of the schedules table."""

    id: str
    owner: str
    kind: ScanKind
    spec: str
    every: str
    created_at: float
    next_run_at: float
    webhook_url: str | None
    webhook_secret: str | None
    engagement: str | None = None


@dataclass(frozen=True)
class RunRecord:
    """One row of the schedule_runs table."""

    id: str
    schedule_id: str
    due_at: float
    status: str
    task_id: str | None
    error: str | None
    finished_at: float | None
    previous_task_id: str | None
    diff: str | None
    webhook_status: str | None
    webhook_attempts: int
    webhook_next_at: float | None
    webhook_error: str | None


@dataclass(frozen=True)
class ScheduleState:
    """A schedule with its latest run (and that run's task status) and its latest change."""

    schedule: ScheduleRecord
    last_run: RunRecord | None
    last_task_status: str | None
    last_change: RunRecord | None


@dataclass(frozen=True)
class SchedulerWork:
    """What the scheduler has to do now: schedules due (none with a run still going), runs
    fired but not yet queued, runs whose task finished, webhooks due; and the next due time."""

    due: list[ScheduleRecord]
    unsubmitted: list[RunRecord]
    finished: list[RunRecord]
    webhooks: list[RunRecord]
    schedules: dict[str, ScheduleRecord]
    next_due: float | None
    # Runs fired whose scan has not ended: their end is looked for at every tick.
    runs_going: bool = False
    # When the next webhook attempt is due.
    next_webhook_at: float | None = None


def link_run(conn: Connection, run_id: str, task_id: str) -> None:
    """In the transaction queueing its task: the pending run `run_id` now has `task_id`, once."""
    pending = (schedule_runs.c.id == run_id) & (schedule_runs.c.status == "pending")
    linked = conn.execute(update(schedule_runs).where(pending).values(status="submitted", task_id=task_id)).rowcount
    if not linked:
        raise RunAlreadyQueued(f"run {run_id} already has its task or no longer exists")


class ScheduleStore:
    """The schedules of every owner, their runs, and the scheduler's lease."""

    def __init__(self, db: Database, feed: ChangeFeed) -> None:
        self._db = db
        self._feed = feed

    async def create(self, values: dict[str, Any], most: int | None) -> None:
        """Store a new schedule (a row of `schedules`) and wake the scheduler; TooManySchedules
        when its owner has `most` already (None: no limit) (counted in the inserting transaction, one owner's
        creations at a time, so that the cap holds across processes)."""
        await self._db.run(self._insert_schedule, values, most)
        self._feed.publish(SCHEDULES_KEY)

    async def states(self, owner: str | None, limit: int, offset: int = 0) -> tuple[list[ScheduleState], int]:
        """The owner's schedules (everyone's with owner None), oldest first, from the `offset`th, with
        their latest run and change; and how many there are in all."""
        return await self._db.run(self._select_schedule_states, owner, limit, offset)

    async def count(self, owner: str) -> int:
        """How many schedules the owner has."""
        return await self._db.run(self._count_schedules, owner)

    async def delete(self, schedule_id: str, owner: str) -> None:
        """Delete the caller's schedule and its runs; ScheduleNotFound for a missing or another owner's id."""
        await self._db.run(self._delete_schedule, schedule_id, owner)

    async def hold_lease(self, name: str, holder: str, holder_name: str, duration_s: float) -> bool:
        """Take or renew the lease `name` for `duration_s`; False while another holder's is unexpired."""
        return await self._db.run(self._hold_lease, name, holder, holder_name, duration_s)

    async def release_lease(self, name: str, holder: str) -> None:
        await self._db.run(self._release_lease, name, holder)

    async def work(self, now: float) -> SchedulerWork:
        """What the scheduler has to do at `now` (see SchedulerWork)."""
        return await self._db.run(self._select_scheduler_work, now)

    async def claim_run(self, schedule: ScheduleRecord, following: float, lease: str, holder: str) -> str | None:
        """Fire the schedule's due time: a new pending run, and `following` as its next run time.
        None when this process no longer holds the lease or the due time was fired already."""
        return await self._db.run(self._claim_run, schedule, following, lease, holder)

    async def postpone(self, schedule: ScheduleRecord, until: float, lease: str, holder: str) -> bool:
        """Move a due schedule's next run time to `until` without a run (its engagement allows
        no scans now); False when this process no longer holds the lease or another moved it."""
        return await self._db.run(self._postpone, schedule, until, lease, holder)

    async def previous_completed_run(self, run: RunRecord) -> RunRecord | None:
        """The latest run of the same schedule, due before `run`, whose scan completed."""
        return await self._db.run(self._select_previous_run, run)

    async def settle_run(self, run_id: str, status: str, *, error: str | None = None,
                         previous_task_id: str | None = None, diff: str | None = None, webhook: bool = False) -> bool:
        """Record a run's end (done or failed), once; with `webhook`, its change is due to be sent."""
        return await self._db.run(self._settle_run, run_id, status, error, previous_task_id, diff, webhook)

    async def claim_webhook_attempt(self, run: RunRecord, retry_at: float) -> bool:
        """Count one more delivery attempt of the run's change (retried at `retry_at` if none
        reports back); False when another process took this attempt."""
        return await self._db.run(self._claim_webhook_attempt, run, retry_at)

    async def record_webhook(self, run_id: str, status: str, error: str | None, next_at: float | None) -> None:
        """How the last attempt went: still pending (retried at `next_at`), sent, or failed."""
        await self._db.run(self._record_webhook, run_id, status, error, next_at)

    def _insert_schedule(self, values: dict[str, Any], most: int | None) -> None:
        owner = values["owner"]
        with self._db.writing() as conn:
            if self._db.postgres:
                conn.execute(_TAKE_SCHEDULE_LOCK, {"p_owner": owner})
            if most is not None and (existing := _count_of(conn, owner)) >= most:
                raise TooManySchedules(f"token '{owner}' may have {most} schedules and has {existing} (the server's "
                                       "limits.schedules); delete one with delete_schedule (list_schedules shows "
                                       "them) before adding another")
            conn.execute(insert(schedules).values(**values))
            self._feed.notify(conn, SCHEDULES_KEY)

    def _count_schedules(self, owner: str) -> int:
        with self._db.reading() as conn:
            return _count_of(conn, owner)

    def _select_schedule_states(self, owner: str | None, limit: int, offset: int) -> tuple[list[ScheduleState], int]:
        # Oldest first, ties (one clock tick) by id, so that pages neither repeat nor skip one.
        query = select(schedules).order_by(schedules.c.created_at, schedules.c.id).limit(limit).offset(offset)
        total = select(func.count()).select_from(schedules)
        if owner is not None:
            query, total = query.where(schedules.c.owner == owner), total.where(schedules.c.owner == owner)
        runs = schedule_runs.c
        with self._db.reading() as conn:
            states = []
            for row in conn.execute(query).all():
                latest = select(schedule_runs).where(runs.schedule_id == row.id).order_by(runs.due_at.desc()).limit(1)
                last = conn.execute(latest).first()
                change = conn.execute(latest.where(runs.diff.is_not(None))).first()
                status = conn.execute(select(tasks.c.status).where(tasks.c.id == last.task_id)).scalar() \
                    if last is not None and last.task_id else None
                states.append(ScheduleState(_schedule(row), _run(last) if last else None, status,
                                            _run(change) if change else None))
            return states, conn.execute(total).scalar_one()

    def _delete_schedule(self, schedule_id: str, owner: str) -> None:
        with self._db.writing() as conn:
            mine = (schedules.c.id == schedule_id) & (schedules.c.owner == owner)
            if not conn.execute(delete(schedules).where(mine)).rowcount:
                raise ScheduleNotFound(f"no schedule {schedule_id!r}")
            conn.execute(delete(schedule_runs).where(schedule_runs.c.schedule_id == schedule_id))

    def _hold_lease(self, name: str, holder: str, holder_name: str, duration_s: float) -> bool:
        now = time.time()
        held = {"holder": holder, "holder_name": holder_name, "expires_at": now + duration_s}
        try:
            with self._db.writing() as conn:
                free = (leases.c.name == name) & ((leases.c.holder == holder) | (leases.c.expires_at < now))
                if conn.execute(update(leases).where(free).values(**held)).rowcount:
                    return True
                if conn.execute(select(leases.c.name).where(leases.c.name == name)).first() is not None:
                    return False
                conn.execute(insert(leases).values(name=name, **held))
                return True
        except IntegrityError:
            return False  # another process inserted the first row at the same moment: it holds it

    def _release_lease(self, name: str, holder: str) -> None:
        with self._db.writing() as conn:
            conn.execute(delete(leases).where(leases.c.name == name, leases.c.holder == holder))

    def _select_scheduler_work(self, now: float) -> SchedulerWork:
        runs, found = schedule_runs.c, schedules.c
        going = select(runs.schedule_id).where(runs.status.in_(RUNS_GOING))
        finished = (select(*schedule_runs.c).select_from(schedule_runs.join(tasks, tasks.c.id == runs.task_id))
                    .where(runs.status == "submitted", tasks.c.status.not_in(ACTIVE_STATUSES)))
        with self._db.reading() as conn:
            due = conn.execute(select(schedules).where(found.next_run_at <= now, found.id.not_in(going))
                               .order_by(found.next_run_at)).all()
            unsubmitted, ended, webhooks = [
                [_run(row) for row in conn.execute(query.order_by(runs.due_at)).all()] for query in (
                    select(schedule_runs).where(runs.status == "pending"), finished,
                    select(schedule_runs).where(runs.webhook_status == "pending", runs.webhook_next_at <= now))]
            ids = {run.schedule_id for group in (unsubmitted, ended, webhooks) for run in group}
            owners = conn.execute(select(schedules).where(found.id.in_(ids))).all() if ids else []
            next_due, going_now, next_webhook_at = conn.execute(select(
                select(func.min(found.next_run_at)).where(found.id.not_in(going)).scalar_subquery(),
                select(func.count()).select_from(going.subquery()).scalar_subquery(),
                select(func.min(runs.webhook_next_at)).where(runs.webhook_status == "pending").scalar_subquery(),
            )).one()
        return SchedulerWork([_schedule(row) for row in due], unsubmitted, ended, webhooks,
                             {row.id: _schedule(row) for row in owners}, next_due, bool(going_now), next_webhook_at)

    def _claim_run(self, schedule: ScheduleRecord, following: float, lease: str, holder: str) -> str | None:
        run_id = str(uuid.uuid4())
        with self._db.writing() as conn:
            if not _move_due(conn, schedule, following, lease, holder):
                return None
            conn.execute(insert(schedule_runs).values(id=run_id, schedule_id=schedule.id, due_at=schedule.next_run_at,
                                                      status="pending", webhook_attempts=0))
        return run_id

    def _postpone(self, schedule: ScheduleRecord, until: float, lease: str, holder: str) -> bool:
        with self._db.writing() as conn:
            return _move_due(conn, schedule, until, lease, holder)

    def _select_previous_run(self, run: RunRecord) -> RunRecord | None:
        runs = schedule_runs.c
        with self._db.reading() as conn:
            row = conn.execute(select(schedule_runs).where(runs.schedule_id == run.schedule_id, runs.status == "done",
                                                           runs.due_at < run.due_at)
                               .order_by(runs.due_at.desc()).limit(1)).first()
        return _run(row) if row else None

    def _settle_run(self, run_id: str, status: str, error: str | None, previous_task_id: str | None,
                    diff: str | None, webhook: bool) -> bool:
        now = time.time()
        going = (schedule_runs.c.id == run_id) & schedule_runs.c.status.in_(RUNS_GOING)
        with self._db.writing() as conn:
            return bool(conn.execute(update(schedule_runs).where(going).values(
                status=status, error=error, finished_at=now, previous_task_id=previous_task_id, diff=diff,
                webhook_status="pending" if webhook else None, webhook_next_at=now if webhook else None,
            )).rowcount)

    def _claim_webhook_attempt(self, run: RunRecord, retry_at: float) -> bool:
        seen = (schedule_runs.c.id == run.id) & (schedule_runs.c.webhook_status == "pending") & (
            schedule_runs.c.webhook_attempts == run.webhook_attempts)
        with self._db.writing() as conn:
            return bool(conn.execute(update(schedule_runs).where(seen).values(
                webhook_attempts=run.webhook_attempts + 1, webhook_next_at=retry_at)).rowcount)

    def _record_webhook(self, run_id: str, status: str, error: str | None, next_at: float | None) -> None:
        pending = (schedule_runs.c.id == run_id) & (schedule_runs.c.webhook_status == "pending")
        with self._db.writing() as conn:
            conn.execute(update(schedule_runs).where(pending).values(webhook_status=status, webhook_error=error,
                                                                     webhook_next_at=next_at))


def _count_of(conn: Connection, owner: str) -> int:
    return conn.execute(select(func.count()).select_from(schedules).where(schedules.c.owner == owner)).scalar_one()


def _move_due(conn: Connection, schedule: ScheduleRecord, following: float, lease: str, holder: str) -> bool:
    """Fenced by the lease: move the schedule's next run time from the due time it was read
    with to `following`; False when the lease is not ours or the due time moved already."""
    ours = (leases.c.name == lease) & (leases.c.holder == holder) & (leases.c.expires_at > time.time())
    due = (schedules.c.id == schedule.id) & (schedules.c.next_run_at == schedule.next_run_at)
    if conn.execute(select(leases.c.name).where(ours)).first() is None:
        return False
    return bool(conn.execute(update(schedules).where(due).values(next_run_at=following)).rowcount)


def _schedule(row: Row[Any]) -> ScheduleRecord:
    data = dict(row._mapping)
    return ScheduleRecord(**data | {"kind": ScanKind(data["kind"])})


def _run(row: Row[Any]) -> RunRecord:
    return RunRecord(**row._mapping)
