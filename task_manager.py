"""The durable scan queue: the only module that talks to the database.

A task is inserted as `queued`, claimed by one guarded statement, run by exactly one nmap
process, and finished by a guarded update. A semaphore bounds concurrent scans; the queue
itself lives in the database, so a restart loses nothing. Liveness lives there too
(`worker_id`, `heartbeat_at`): running tasks left by a dead process are marked
`interrupted`, never re-run, and never hold capacity.

Database calls use SQLAlchemy Core on a synchronous engine in worker threads: measured
here, that is several times faster per lookup than the async ORM (see docs/performance).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
import uuid
import weakref
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event, func, literal, select, update
from sqlalchemy.engine import Row

from models import Progress, ScanKind, ScanResult, TaskStatus, metadata, tasks
from nmap_report import ReportParser, clean_text
from scanner import ScanOutcome, interpret_run, run_nmap

logger = logging.getLogger(__name__)
T = TypeVar("T")

HEARTBEAT_SECONDS = 5.0
# A running task whose worker has not beaten for this long is considered orphaned.
STALE_AFTER_SECONDS = 30.0
# An idle dispatcher re-reads the queue this often, to pick up work another process queued.
IDLE_RECHECK_SECONDS = 5.0
_SUMMARY_COLUMNS = [c for c in tasks.c if c.name not in ("result", "raw_xml")]
_RESULT_COLUMNS = [c for c in tasks.c if c.name != "raw_xml"]


class TaskNotFound(LookupError):
    """No task with that id belongs to the caller."""


class QueueFull(RuntimeError):
    """The queue already holds max_queued_tasks waiting tasks."""


class TaskAlreadyFinished(RuntimeError):
    """The task finished before it could be cancelled."""


@dataclass(frozen=True)
class TaskRecord:
    """One row of the tasks table, as callers see it."""

    id: str
    owner: str
    kind: ScanKind
    target: str
    argv: list[str]
    status: TaskStatus
    time_limit: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: str | None
    progress: Progress | None = None
    result: ScanResult | None = None


def create_db_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL mode and a busy timeout."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, pool_size=8)
    engine = create_engine(url, connect_args={"timeout": 5.0})
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class TaskManager:
    """Queue, run and track nmap scans; see the module docstring for the guarantees."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_concurrent: int,
        max_queued: int,
        shutdown_grace: float = 5.0,
    ) -> None:
        self._engine = engine
        self._max_queued = max_queued
        self._grace = shutdown_grace
        self._slots = asyncio.Semaphore(max_concurrent)
        self._wakeup = asyncio.Event()
        self._stopping = False
        self._running: dict[str, asyncio.Task[None]] = {}
        # Live state of the scans this process runs: their reports as they stream, progress.
        self._reports: dict[str, ReportParser] = {}
        self._progress: dict[str, Progress] = {}
        self._changes: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()
        self._submit_locks: weakref.WeakValueDictionary[tuple[str, ScanKind, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )
        self._side_tasks: list[asyncio.Task[None]] = []
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the schema, resolve what a dead process left behind, start the workers."""
        await self._db(metadata.create_all, self._engine)
        interrupted = await self._db(self._reap_orphans)
        if interrupted:
            logger.warning("marked %d task(s) left running by a dead process as interrupted", interrupted)
        self._side_tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatcher"),
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
        ]

    async def stop(self) -> None:
        """Stop claiming, give running scans a grace period, then cancel and record them."""
        self._stopping = True
        for side in self._side_tasks:
            side.cancel()
        await asyncio.gather(*self._side_tasks, return_exceptions=True)
        running = list(self._running.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=self._grace)
            for run in pending:
                run.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        self._engine.dispose()

    # ---- the API the server calls -------------------------------------------------------

    async def submit(
        self, owner: str, kind: ScanKind, target: str, argv: Sequence[str], time_limit: int
    ) -> TaskRecord:
        """Queue a scan; raise QueueFull when the queue is at its bound."""
        task_id = str(uuid.uuid4())
        values = {
            "id": task_id,
            "owner": owner,
            "kind": kind.value,
            "target": target,
            "argv": json.dumps(list(argv)),
            "status": TaskStatus.QUEUED.value,
            "created_at": time.time(),
            "time_limit": time_limit,
        }
        if not await self._db(self._insert_bounded, values):
            raise QueueFull(
                f"the scan queue is full ({self._max_queued} tasks waiting); "
                "try again later or cancel queued tasks"
            )
        self._wakeup.set()
        return _record(values | {"started_at": None, "finished_at": None, "error": None})

    async def wait(
        self,
        task_id: str,
        owner: str,
        timeout: float,
        on_progress: Callable[[Progress], Awaitable[None]] | None = None,
    ) -> TaskRecord:
        """Wait up to `timeout` s for the task to finish, reporting progress as it comes;
        the scan goes on either way. Woken by events, never by polling."""
        loop = asyncio.get_running_loop()
        changed = self._changes.setdefault(task_id, asyncio.Event())
        deadline = loop.time() + timeout
        reported: Progress | None = None
        while True:
            changed.clear()  # before reading, so a change after the read still wakes us
            record = await self.get(task_id, owner)
            remaining = deadline - loop.time()
            if record.status.finished or remaining <= 0:
                break
            if on_progress is not None and record.progress is not None and record.progress != reported:
                reported = record.progress
                await on_progress(reported)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return await self.get(task_id, owner, with_result=True) if record.status.finished else record

    async def get(self, task_id: str, owner: str, *, with_result: bool = False) -> TaskRecord:
        """The caller's task; TaskNotFound for a missing id and for another owner's id alike."""
        row = await self._db(self._select_one, task_id, owner, with_result)
        if row is None:
            raise TaskNotFound(f"no task {task_id!r}")
        record = _record(row)
        live = self._progress.get(task_id)
        return replace(record, progress=live) if live is not None and not record.status.finished else record

    def live_result(self, record: TaskRecord) -> ScanResult | None:
        """The hosts a scan running in this process has finished so far (partial), if any."""
        report = self._reports.get(record.id)
        if report is None or record.status.finished or not report.hosts:
            return None
        return report.result(record.target)

    async def raw_xml(self, task_id: str, owner: str) -> bytes | None:
        """nmap's XML report as it was written (None while the task has none)."""
        stored = await self._db(self._select_raw, task_id, owner)
        if stored is None:
            report = self._reports.get(task_id)
            return bytes(report.raw) if report is not None else None
        return zlib.decompress(stored)

    async def submit_or_reuse(
        self, owner: str, kind: ScanKind, target: str, argv: Sequence[str], time_limit: int, fresh_since: float | None
    ) -> tuple[TaskRecord, bool]:
        """Submit a scan, unless the caller has the same one queued, running, or completed
        since `fresh_since` (None: always submit). Returns the task and whether it was reused.
        Look-up and submit hold one lock per scan, so simultaneous calls share one task."""
        lock = self._submit_locks.setdefault((owner, kind, target), asyncio.Lock())
        async with lock:
            if fresh_since is not None:
                row = await self._db(self._select_recent, owner, kind, target, fresh_since)
                if row is not None:
                    return _record(row), True
            return await self.submit(owner, kind, target, argv, time_limit), False

    async def list(self, owner: str, status: TaskStatus | None, limit: int) -> list[TaskRecord]:
        """The caller's most recent tasks, newest first."""
        rows = await self._db(self._select_many, owner, status, limit)
        return [_record(row) for row in rows]

    async def cancel(self, task_id: str, owner: str) -> TaskRecord:
        """Cancel a queued or running task; its nmap process group is killed."""
        cancelled = await self._db(self._mark_cancelled, task_id, owner)
        if not cancelled:
            record = await self.get(task_id, owner)
            raise TaskAlreadyFinished(f"task {task_id} is already {record.status.value}")
        run = self._running.get(task_id)
        if run is not None:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
        self._signal_changed(task_id)
        return await self.get(task_id, owner)

    # ---- workers ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._slots.acquire()
            self._wakeup.clear()
            try:
                record = await self._db(self._claim_next)
            except Exception:
                logger.exception("claiming the next task failed; retrying")
                record = None
            if record is None:
                self._slots.release()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), IDLE_RECHECK_SECONDS)
                continue
            run = asyncio.create_task(self._run(record), name=f"scan-{record.id}")
            self._running[record.id] = run
            run.add_done_callback(partial(self._on_run_done, record.id))

    def _on_run_done(self, task_id: str, _run: asyncio.Task[None]) -> None:
        self._running.pop(task_id, None)
        self._slots.release()

    async def _run(self, record: TaskRecord) -> None:
        limit = float(record.time_limit)
        report = self._reports[record.id] = ReportParser()

        def on_output(chunk: bytes) -> None:
            progress = report.progress
            report.feed(chunk)
            if report.progress is not None and report.progress != progress:
                self._progress[record.id] = report.progress
                self._signal_changed(record.id)

        try:
            run = await run_nmap(record.argv, time_limit=limit, stdout_sink=on_output)
            outcome = interpret_run(run, report, record.target, limit)
            if outcome.status is TaskStatus.FAILED:
                logger.warning(
                    "task %s failed: %s; nmap stderr: %s",
                    record.id, outcome.error, clean_text(run.stderr.decode("utf-8", "replace"), 2000),
                )
            await self._finish(record.id, outcome)
        except asyncio.CancelledError:
            await asyncio.shield(self._finish(record.id, self._stopped_outcome(record, report)))
            raise
        except Exception:
            logger.exception("task %s crashed", record.id)
            outcome = ScanOutcome(TaskStatus.FAILED, None, "internal error while running the scan", b"")
            await self._finish(record.id, outcome)
        finally:
            del self._reports[record.id]
            self._progress.pop(record.id, None)
            self._signal_changed(record.id)

    def _stopped_outcome(self, record: TaskRecord, report: ReportParser) -> ScanOutcome:
        """A scan cancelled or cut by shutdown keeps the hosts it had finished."""
        partial = report.result(record.target)
        if self._stopping:
            status, error = TaskStatus.INTERRUPTED, "the server shut down during the scan; submit it again"
        else:
            status, error = TaskStatus.CANCELLED, "cancelled"
        return ScanOutcome(status, partial if partial.hosts else None, error, bytes(report.raw))

    async def _finish(self, task_id: str, outcome: ScanOutcome) -> None:
        if not await self._db(self._mark_finished, task_id, outcome):
            logger.info("task %s was already resolved elsewhere; keeping that state", task_id)

    def _signal_changed(self, task_id: str) -> None:
        changed = self._changes.get(task_id)
        if changed is not None:
            changed.set()

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            try:
                gone = await self._db(self._beat, dict(self._progress), list(self._running))
                await self._db(self._reap_orphans)
            except Exception:
                logger.exception("heartbeat failed; retrying")
                continue
            for task_id in gone:
                # Cancelled through another process: stop our nmap too.
                if (run := self._running.get(task_id)) is not None:
                    run.cancel()

    async def _db(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    # ---- SQL: every statement of the service lives below --------------------------------

    def _insert_bounded(self, values: dict[str, Any]) -> bool:
        # One statement, so the bound holds under concurrent submissions on SQLite.
        queued = select(func.count()).select_from(tasks).where(tasks.c.status == TaskStatus.QUEUED.value)
        source = select(*(literal(v, tasks.c[k].type) for k, v in values.items())).where(
            queued.scalar_subquery() < self._max_queued
        )
        with self._engine.begin() as conn:
            inserted = tasks.insert().from_select(list(values), source).returning(tasks.c.id)
            return conn.execute(inserted).first() is not None

    def _claim_next(self) -> TaskRecord | None:
        now = time.time()
        oldest = (
            select(tasks.c.id)
            .where(tasks.c.status == TaskStatus.QUEUED.value)
            .order_by(tasks.c.created_at)
            .limit(1)
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )
        claim = (
            update(tasks)
            .where(tasks.c.id == oldest, tasks.c.status == TaskStatus.QUEUED.value)
            .values(status=TaskStatus.RUNNING.value, started_at=now, worker_id=self.worker_id, heartbeat_at=now)
            .returning(*_SUMMARY_COLUMNS)
        )
        with self._engine.begin() as conn:
            row = conn.execute(claim).first()
        return None if row is None else _record(row)

    def _mark_finished(self, task_id: str, outcome: ScanOutcome) -> bool:
        values = {
            "status": outcome.status.value,
            "finished_at": time.time(),
            "error": outcome.error,
            "result": None if outcome.result is None else outcome.result.model_dump_json(),
            "progress": None,
            "raw_xml": zlib.compress(outcome.raw_xml) if outcome.raw_xml else None,
        }
        guarded = update(tasks).where(
            tasks.c.id == task_id,
            tasks.c.status == TaskStatus.RUNNING.value,
            tasks.c.worker_id == self.worker_id,
        )
        with self._engine.begin() as conn:
            return conn.execute(guarded.values(**values)).rowcount == 1

    def _mark_cancelled(self, task_id: str, owner: str) -> bool:
        """Cancel a queued task here. A running task of this process is left to its runner,
        which records `cancelled` with the hosts it had finished; one of another process is
        marked here, and that process's heartbeat stops its nmap. False: not cancellable."""
        with self._engine.begin() as conn:
            queued = update(tasks).where(
                tasks.c.id == task_id, tasks.c.owner == owner, tasks.c.status == TaskStatus.QUEUED.value
            )
            values = {"status": TaskStatus.CANCELLED.value, "finished_at": time.time(), "error": "cancelled"}
            if conn.execute(queued.values(**values)).rowcount == 1:
                return True
            running = select(tasks.c.worker_id).where(
                tasks.c.id == task_id, tasks.c.owner == owner, tasks.c.status == TaskStatus.RUNNING.value
            )
            worker = conn.execute(running).scalar_one_or_none()
            if worker is None:
                return False
            if worker != self.worker_id:
                return conn.execute(
                    update(tasks).where(tasks.c.id == task_id, tasks.c.status == TaskStatus.RUNNING.value)
                    .values(**values)
                ).rowcount == 1
            return True

    def _beat(self, progress: dict[str, Progress], running_ids: list[str]) -> list[str]:
        """Refresh our heartbeat and our tasks' progress; return local task ids that are
        no longer running in the database (cancelled through another process)."""
        if not running_ids:
            return []
        with self._engine.begin() as conn:
            conn.execute(
                update(tasks)
                .where(tasks.c.worker_id == self.worker_id, tasks.c.status == TaskStatus.RUNNING.value)
                .values(heartbeat_at=time.time())
            )
            for task_id, current in progress.items():
                conn.execute(
                    update(tasks)
                    .where(tasks.c.id == task_id, tasks.c.status == TaskStatus.RUNNING.value)
                    .values(progress=current.model_dump_json())
                )
            still = conn.execute(
                select(tasks.c.id).where(
                    tasks.c.id.in_(running_ids), tasks.c.status == TaskStatus.RUNNING.value
                )
            ).scalars()
            return sorted(set(running_ids) - set(still))

    def _reap_orphans(self) -> int:
        """Mark running tasks of dead workers interrupted: a stale heartbeat, or a worker
        process on this host that no longer exists."""
        with self._engine.begin() as conn:
            candidates = conn.execute(
                select(tasks.c.id, tasks.c.worker_id, tasks.c.heartbeat_at).where(
                    tasks.c.status == TaskStatus.RUNNING.value, tasks.c.worker_id != self.worker_id
                )
            ).all()
            dead = [row.id for row in candidates if _worker_is_dead(row.worker_id, row.heartbeat_at)]
            if not dead:
                return 0
            values = {
                "status": TaskStatus.INTERRUPTED.value,
                "finished_at": time.time(),
                "error": "the server process running this scan stopped before it finished; submit it again",
            }
            guarded = update(tasks).where(tasks.c.id.in_(dead), tasks.c.status == TaskStatus.RUNNING.value)
            return conn.execute(guarded.values(**values)).rowcount

    def _select_raw(self, task_id: str, owner: str) -> bytes | None:
        query = select(tasks.c.raw_xml).where(tasks.c.id == task_id, tasks.c.owner == owner)
        with self._engine.connect() as conn:
            return conn.execute(query).scalar_one_or_none()

    def _select_recent(self, owner: str, kind: ScanKind, target: str, since: float) -> Row[Any] | None:
        active = (TaskStatus.QUEUED.value, TaskStatus.RUNNING.value)
        query = (
            select(*_SUMMARY_COLUMNS)
            .where(tasks.c.owner == owner, tasks.c.kind == kind.value, tasks.c.target == target)
            .where(
                tasks.c.status.in_(active)
                | ((tasks.c.status == TaskStatus.COMPLETED.value) & (tasks.c.finished_at >= since))
            )
            .order_by(tasks.c.created_at.desc())
            .limit(1)
        )
        with self._engine.connect() as conn:
            return conn.execute(query).first()

    def _select_one(self, task_id: str, owner: str, with_result: bool) -> Row[Any] | None:
        columns = _RESULT_COLUMNS if with_result else _SUMMARY_COLUMNS
        query = select(*columns).where(tasks.c.id == task_id, tasks.c.owner == owner)
        with self._engine.connect() as conn:
            return conn.execute(query).first()

    def _select_many(self, owner: str, status: TaskStatus | None, limit: int) -> list[Row[Any]]:
        query = select(*_SUMMARY_COLUMNS).where(tasks.c.owner == owner)
        if status is not None:
            query = query.where(tasks.c.status == status.value)
        query = query.order_by(tasks.c.created_at.desc()).limit(limit)
        with self._engine.connect() as conn:
            return list(conn.execute(query).all())


def _worker_is_dead(worker_id: str | None, heartbeat_at: float | None) -> bool:
    if heartbeat_at is None or time.time() - heartbeat_at > STALE_AFTER_SECONDS:
        return True
    host, _, rest = (worker_id or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _record(row: Row[Any] | Mapping[str, Any]) -> TaskRecord:
    data = row._mapping if isinstance(row, Row) else row
    result, progress = data.get("result"), data.get("progress")
    return TaskRecord(
        id=data["id"],
        owner=data["owner"],
        kind=ScanKind(data["kind"]),
        target=data["target"],
        argv=json.loads(data["argv"]),
        status=TaskStatus(data["status"]),
        time_limit=data["time_limit"],
        created_at=data["created_at"],
        started_at=data["started_at"],
        finished_at=data["finished_at"],
        error=data["error"],
        progress=Progress.model_validate_json(progress) if progress else None,
        result=ScanResult.model_validate_json(result) if result else None,
    )
