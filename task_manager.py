"""What callers do to tasks: submit, read, wait, results, list, cancel.

A task is inserted `queued` (identical calls share one task through a unique dedupe key); a
worker claims and runs it (worker_store.py). Everything a caller can see (progress, the hosts
finished so far, the result) is written as it happens, so every process reads the same truth,
and a waiting call is woken by the change feed (change_feed.py) rather than by polling.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, NamedTuple

from sqlalchemy import BindParameter, Connection, bindparam, func, insert, select, update
from sqlalchemy.engine import Row

from approval_store import REQUESTED_KEY, request_in, withdraw_in
from change_feed import POLL_SECONDS, ChangeFeed, first_of, queue_key
from config import Limits
from db import SUBMIT_LOCK, Database
from impact import probes
from limits import add_usage, check_engagement_probes, check_submission
from models import (
    ACTIVE_STATUSES,
    TASK_SUMMARY,
    Progress,
    ResultPage,
    ScanKind,
    ScanResult,
    TaskRecord,
    TaskStatus,
    WorkerInfo,
    approvals,
    stored_host,
    task_hosts,
    tasks,
)
from nmap_report import RunStats, build_result, merge_results
from result_store import (
    ReportPage,
    StoredPage,
    StoredParts,
    assembled,
    delete_found,
    page_of,
    read_page,
    read_report,
    read_whole,
)
from scanner import scanned_addresses
from schedule_store import link_run
from sharding import Shard, shards_progress
from worker_store import claim_in

# At most this many task reads in one query (far below SQLite's limit of bound parameters).
READ_BATCH = 500

# ---- the statements every call runs, built once (see worker_store.py for why) -------------
_P: dict[str, BindParameter[str]] = {name: bindparam(f"p_{name}") for name in ("id", "owner")}
_TAKE_SUBMIT_LOCK = select(func.pg_advisory_xact_lock(SUBMIT_LOCK))
_COMPLETED_OF_KIND = select(tasks.c.probe_count, (tasks.c.finished_at - tasks.c.started_at).label("seconds")).where(
    tasks.c.kind == bindparam("p_kind"), tasks.c.pool == bindparam("p_pool"),
    tasks.c.status == TaskStatus.COMPLETED.value, tasks.c.probe_count > 0, tasks.c.started_at.is_not(None))
# The fleet's last completed top-level scans of a kind in a pool, read from ix_tasks_history alone.
HISTORY = (_COMPLETED_OF_KIND.where(tasks.c.parent_id.is_(None))
           .order_by(tasks.c.finished_at.desc()).limit(bindparam("p_limit")))
# The same pool's last nmap runs of a kind: scans run whole and shards, not a sharded scan's
# parent (its time is its shards' at once), from ix_tasks_history alone.
RUN_HISTORY = (_COMPLETED_OF_KIND.where(tasks.c.shard_count == 0)
               .order_by(tasks.c.finished_at.desc()).limit(bindparam("p_limit")))
# A shareable scan's twin: the same call queued or running, or completed recently enough.
_ACTIVE_TWIN = select(*TASK_SUMMARY).where(tasks.c.dedupe_key == bindparam("p_dedupe_key"))
# Found by the call's digest in ix_tasks_fresh: one index entry and one row, however many
# tasks the token has. The owner is checked on that row too, so that no token reads another's
# task on the strength of a hash alone.
FRESH_TWIN = (
    select(*TASK_SUMMARY)
    .where(tasks.c.call_key == bindparam("p_call_key"), tasks.c.status == TaskStatus.COMPLETED.value,
           tasks.c.finished_at >= bindparam("p_fresh_since"), tasks.c.owner == _P["owner"])
    .order_by(tasks.c.finished_at.desc())
    .limit(1)
)
_INSERT_TASKS = insert(tasks)
_READ_TASK = select(*TASK_SUMMARY).where(tasks.c.id == _P["id"], tasks.c.owner == _P["owner"],
                                             tasks.c.parent_id.is_(None))
_READ_TASKS = select(*TASK_SUMMARY).where(tasks.c.id.in_(bindparam("p_ids", expanding=True)),
                                          tasks.c.parent_id.is_(None))


class TaskNotFound(LookupError):
    """No task with that id belongs to the caller."""


class TaskAlreadyFinished(RuntimeError):
    """The task finished before it could be cancelled."""


class ApprovalRequest(NamedTuple):
    """A new task that waits for a person's yes: its engagement, why, and for how long."""

    engagement: str
    reasons: list[str]
    expires_after_s: float


class Found(NamedTuple):
    """What a task without a result has found so far, as stored (see TaskManager._select_found)."""

    shards: list[StoredParts]
    hosts: list[str]


class Submitted(NamedTuple):
    """What `submit` did: the caller's task, whether it was an identical one reused, and the
    queued task it leased to `claim_for` (the pool's oldest: the new one, or an older one)."""

    record: TaskRecord
    reused: bool
    claimed: TaskRecord | None = None


def dedupe_key(owner: str, kind: ScanKind, argv: Sequence[str], engagement: str | None = None) -> str:
    """Identical calls: the same caller, tool, canonical nmap argv and engagement (a scan
    under one engagement is no evidence for another)."""
    called = [owner, kind.value, list(argv)] + ([engagement] if engagement else [])
    return hashlib.sha256(json.dumps(called).encode()).hexdigest()


class TaskManager:
    """The callers' tasks; see the module docstring for its guarantees."""

    def __init__(self, db: Database, feed: ChangeFeed, *, max_queued: int, lease_seconds: float = 30.0) -> None:
        self._db = db
        self.feed = feed
        self._max_queued = max_queued
        # The lease a task claimed by a submission (`claim_for`) gets, as worker_store gives it.
        self._lease_seconds = lease_seconds
        # Task reads waiting for the next batch, and the task that serves them (see `get`).
        self._reads: list[tuple[str, str, asyncio.Future[TaskRecord]]] = []
        self._reader: asyncio.Task[None] | None = None

    async def stop(self) -> None:
        """Let the reads under way finish."""
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def submit(
        self,
        owner: str,
        kind: ScanKind,
        target: str,
        argv: Sequence[str],
        time_limit: int,
        *,
        pool: str = "default",
        share: bool = False,
        fresh_since: float | None = None,
        shards: Sequence[Shard] = (),
        limits: Limits | None = None,
        address_count: int = 0,
        probe_count: int = 0,
        forced: bool = False,
        schedule_run: str | None = None,
        claim_for: WorkerInfo | None = None,
        engagement: str | None = None,
        engagement_probes: int | None = None,
        approval: ApprovalRequest | None = None,
    ) -> Submitted:
        """Queue a scan (as shards when given), or with `share` return the caller's identical
        scan already queued or running, or completed since `fresh_since`. QueueFull when the
        queue is at its bound, RateLimited when a new task would pass one of `limits` (a
        reused task passes none). A `schedule_run` is linked to the task in the same
        transaction, once (RunAlreadyQueued otherwise).

        With `claim_for`, a worker of this process with a free slot, the same transaction
        also claims the pool's oldest queued task for it, as its claim loop would have: no
        second transaction, and no wake-up of any worker when nothing is left queued.

        With `approval` the task (and its shards) waits in awaiting_approval, its approval
        request written in the same transaction (approval_store)."""
        values = _task_values(owner, kind, target, argv, time_limit, pool=pool, share=share, shards=shards,
                              address_count=address_count, probe_count=probe_count, forced=forced,
                              engagement=engagement, awaiting=approval is not None)
        row, reused, claimed, left_queued = await self._db.run(
            self._submit, values, fresh_since, shards, limits, schedule_run, claim_for, approval, engagement_probes)
        if left_queued:
            self.feed.publish(queue_key(pool))
        if approval is not None and not reused:
            self.feed.publish(REQUESTED_KEY)
        return Submitted(TaskRecord.from_row(row), reused, claimed)

    async def trial(
        self, owner: str, kind: ScanKind, target: str, argv: Sequence[str], time_limit: int, *,
        pool: str = "default", share: bool = False, fresh_since: float | None = None, shards: Sequence[Shard] = (),
        limits: Limits | None = None, address_count: int = 0, probe_count: int = 0, forced: bool = False,
        engagement: str | None = None, engagement_probes: int | None = None,
    ) -> TaskRecord | None:
        """What `submit` with these arguments would do now, without writing anything: the task
        it would reuse, or None when it would queue a new one; RateLimited or QueueFull as
        `submit` would raise them."""
        values = _task_values(owner, kind, target, argv, time_limit, pool=pool, share=share, shards=shards,
                              address_count=address_count, probe_count=probe_count, forced=forced,
                              engagement=engagement)
        row = await self._db.run(self._trial, values, fresh_since, shards, limits, engagement_probes)
        return None if row is None else TaskRecord.from_row(row)

    async def history(self, kind: ScanKind, pool: str, limit: int) -> list[tuple[int, float]]:
        """(probes, seconds from start to end) of the fleet's last `limit` completed top-level
        scans of `kind` in `pool`, newest first: what plan_scan estimates from. Only counts and
        times, nothing of whose scans they were or where they went."""
        return await self._db.run(self._history, kind, pool, limit)

    async def run_history(self, kind: ScanKind, pool: str, limit: int) -> list[tuple[int, float]]:
        """(probes, seconds from start to end) of the last `limit` nmap runs of completed scans
        of `kind` in `pool`, newest first: each scan run whole and each shard, what one run of
        nmap does at a time there (sharding.waits_on_network reads its pace)."""
        return await self._db.run(self._history, kind, pool, limit, RUN_HISTORY)

    def _history(self, kind: ScanKind, pool: str, limit: int, statement: Any = HISTORY) -> list[tuple[int, float]]:
        with self._db.reading() as conn:
            rows = conn.execute(statement, {"p_kind": kind.value, "p_pool": pool, "p_limit": limit}).all()
        return [(int(row.probe_count), float(row.seconds)) for row in rows]

    async def get(self, task_id: str, owner: str) -> TaskRecord:
        """The caller's task; TaskNotFound for a missing id and for another owner's id alike.

        Without the result, reads are batched: those that arrive while a batch is being read
        are read together next, in one query and one thread hand-off. Status polls come many
        at a time, and a hand-off per poll cost more than the query (bench/status_polling.py:
        a third of the server's CPU per poll on SQLite)."""
        read: asyncio.Future[TaskRecord] = asyncio.get_running_loop().create_future()
        self._reads.append((task_id, owner, read))
        if self._reader is None or self._reader.done():
            self._reader = asyncio.create_task(self._serve_reads(), name="task-reads")
        return await read

    async def _serve_reads(self) -> None:
        while self._reads:
            batch, self._reads = self._reads[:READ_BATCH], self._reads[READ_BATCH:]
            try:
                found = await self._db.run(self._read_many, sorted({task_id for task_id, _, _ in batch}))
            except Exception as e:  # noqa: BLE001 (DatabaseUnavailable, or a bug: every read of the batch gets it)
                for _, _, read in batch:
                    if not read.done():
                        read.set_exception(e)
                continue
            for task_id, owner, read in batch:
                record = found.get(task_id)
                if read.done():
                    continue  # its caller gave up
                if record is None or record.owner != owner:
                    read.set_exception(TaskNotFound(f"no task {task_id!r}"))
                else:
                    read.set_result(record)

    async def wait(
        self,
        task_id: str,
        owner: str,
        timeout_s: float,
        on_progress: Callable[[Progress], Awaitable[None]] | None = None,
        stop: asyncio.Event | None = None,
        *,
        known: TaskRecord | None = None,
    ) -> TaskRecord:
        """Wait up to `timeout_s` (or until `stop` is set) for the task to finish (a completed
        one: and to be folded into the inventory), reporting
        progress as it changes; the scan goes on either way. Woken by the change feed; each
        wake-up reads the task once (never its result: result_page reads what is shown).

        `known` is the task as the caller has just read it (as `submit` returned it): it is
        not read again before the first wake-up, a read per scan saved. A change made between
        that read and this subscription was not heard, so that first sleep is at most
        POLL_SECONDS."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        reported: Progress | None = None
        with self.feed.subscribe(task_id) as changed:
            while True:
                changed.clear()  # before reading, so a change after the read still wakes us
                verdict = changed.verdict if changed.verdict is not None and changed.verdict.owner == owner else None
                record = known or verdict or (await self._db.run(self._read, task_id, owner))[0]
                remaining_s = deadline - loop.time()
                # A completed scan is done once folded into the inventory: a call that waited for
                # it finds its hosts there (find_hosts), in whichever process it waited.
                done = record.status.finished and not record.folding
                if done or remaining_s <= 0 or (stop is not None and stop.is_set()):
                    return record
                if on_progress is not None and record.progress is not None and record.progress != reported:
                    reported = record.progress
                    await on_progress(reported)
                await first_of(changed, stop, remaining_s if known is None else min(remaining_s, POLL_SECONDS))
                known = None

    async def result_page(self, record: TaskRecord, offset: int, limit: int) -> ResultPage | None:
        """Hosts [offset, offset + limit) of the task's result with its counts, reading only
        the chunks that hold them (result_store.py); while it runs, or after it stopped without
        a result, what was found so far (partial: the hosts finished, and those still scanned
        with the open ports nmap announced), sliced from the whole of it; None when there is
        nothing."""
        stored = await self._db.run(self._read_page, record.id, offset, limit)
        if stored is not None:
            return page_of(stored, offset, limit)
        found = await self._db.run(self._select_found, record)
        if not found.shards and not found.hosts:
            return None
        # Parsing takes long for many hosts: no deadline for that part.
        result = await self._db.run(_partial_result, record, found, deadline=False)
        if result is None:
            return None
        window = result.hosts[offset: offset + limit]
        return ResultPage(result.model_copy(update={"hosts": []}), window, offset, len(window), len(result.hosts))

    async def report_page(self, task_id: str, offset: int, count: int) -> ReportPage | None:
        """Up to `count` characters of nmap's XML report of the task from `offset` (a sharded
        task's: each shard's report in turn); None while it has none."""
        return await self._db.run(self._read_report, task_id, offset, count)

    async def recent(self, owner: str | Sequence[str] | None, status: TaskStatus | None,
                     limit: int) -> list[TaskRecord]:
        """The most recent tasks of the owner (or of each owner listed; with None every owner's,
        for operators), newest first."""
        rows = await self._db.run(self._select_recent, owner, status, limit)
        return [TaskRecord.from_row(row._mapping) for row in rows]

    async def cancel(self, task_id: str, owner: str) -> TaskRecord:
        """Mark a queued or running task (and its shards) cancelled; the worker running it
        hears of it through the change feed and stops its nmap."""
        record, shard_ids = await self._db.run(self._cancel, task_id, owner)
        self.feed.publish(task_id, *shard_ids)
        return record

    async def purge(self, before: float) -> int:
        """Delete finished tasks (with their shards and live rows) that finished before
        `before`; how many top-level tasks."""
        return await self._db.purge(_delete_finished_tasks, before)

    def _submit(
        self, values: dict[str, Any], fresh_since: float | None, shards: Sequence[Shard],
        limits: Limits | None, schedule_run: str | None, claim_for: WorkerInfo | None,
        approval: ApprovalRequest | None, engagement_probes: int | None,
    ) -> tuple[Mapping[Any, Any], bool, TaskRecord | None, bool]:
        """(the task's row, reused, the task claimed for `claim_for`, whether a task this
        submission queued is still queued)."""
        with self._db.writing() as conn:
            if self._db.postgres:
                conn.execute(_TAKE_SUBMIT_LOCK)
            shared = _admit(conn, values, fresh_since, shards, limits, self._max_queued, engagement_probes)
            if shared is not None:
                return shared._mapping, True, None, False
            if schedule_run is not None:
                link_run(conn, schedule_run, values["id"])
            rows = [values, *_shard_rows(values, shards)]
            conn.execute(_INSERT_TASKS, rows)
            add_usage(conn, self._db.dialect, values)
            if approval is not None:
                request_in(conn, self.feed, values["id"], approval.engagement, values["owner"], approval.reasons,
                           values["created_at"], approval.expires_after_s)
            claimed = claim_in(conn, claim_for, values["pool"], 1, values["created_at"],
                               self._lease_seconds) if claim_for else []
            # What this submission queued (its task, or its shards: a parent is never claimed)
            # is still queued unless the claim took the one task it queued.
            took_own = bool(claimed) and claimed[0].id in {row["id"] for row in rows}
            left_queued = approval is None and (len(shards) > 1 or not took_own)
            if left_queued:
                self.feed.notify(conn, queue_key(values["pool"]))
        return (values | {"started_at": None, "finished_at": None, "error": None}, False,
                claimed[0] if claimed else None, left_queued)

    def _trial(self, values: dict[str, Any], fresh_since: float | None, shards: Sequence[Shard],
               limits: Limits | None, engagement_probes: int | None) -> Mapping[Any, Any] | None:
        with self._db.reading() as conn:
            shared = _admit(conn, values, fresh_since, shards, limits, self._max_queued, engagement_probes)
        return None if shared is None else shared._mapping

    async def stored_result(self, task_id: str, owner: str) -> tuple[TaskRecord, StoredParts | None]:
        """One task and its whole result as stored (which only a finished task has), compressed:
        what compares results reads its hosts a chunk at a time (result_store.hosts_in), not
        both results parsed whole (a 65,536-host result is 460 MB of models)."""
        return await self._db.run(self._read, task_id, owner)

    def _read(self, task_id: str, owner: str) -> tuple[TaskRecord, StoredParts | None]:
        with self._db.reading() as conn:
            row = conn.execute(_READ_TASK, {"p_id": task_id, "p_owner": owner}).first()
            if row is None:
                raise TaskNotFound(f"no task {task_id!r}")
            record = _with_shard_progress(conn, TaskRecord.from_row(row._mapping))
            return record, read_whole(conn, task_id)

    def _read_many(self, task_ids: list[str]) -> dict[str, TaskRecord]:
        """Top-level tasks by id, without their results (callers check the owner)."""
        with self._db.reading() as conn:
            rows = conn.execute(_READ_TASKS, {"p_ids": task_ids}).all()
            return {row.id: _with_shard_progress(conn, TaskRecord.from_row(row._mapping)) for row in rows}

    def _read_page(self, task_id: str, offset: int, limit: int) -> StoredPage | None:
        with self._db.reading() as conn:
            return read_page(conn, task_id, offset, limit)

    def _select_found(self, record: TaskRecord) -> Found:
        """What a task without a result has found so far, as stored: the results of its shards
        that finished, and the hosts finished by it or by its running shards."""
        with self._db.reading() as conn:
            if record.shard_count:
                shards = conn.execute(
                    select(tasks.c.id, tasks.c.result.is_not(None)).where(tasks.c.parent_id == record.id)
                ).all()
                results = [parts for task_id, ended in shards if ended and (parts := read_whole(conn, task_id))]
                ids = [task_id for task_id, ended in shards if not ended]
            else:
                results, ids = [], [record.id]
            hosts = conn.execute(
                select(task_hosts.c.data).where(task_hosts.c.task_id.in_(ids))
                .order_by(task_hosts.c.task_id, task_hosts.c.seq)
            ).scalars().all()
        return Found(results, list(hosts))

    def _read_report(self, task_id: str, offset: int, count: int) -> ReportPage | None:
        with self._db.reading() as conn:
            return read_report(conn, task_id, offset, count)

    async def owner_of(self, task_id: str) -> str | None:
        """Who started the task `task_id`; None when there is no such task."""
        return await self._db.run(self._select_owner, task_id)

    def _select_owner(self, task_id: str) -> str | None:
        with self._db.reading() as conn:
            return conn.execute(select(tasks.c.owner).where(tasks.c.id == task_id)).scalar_one_or_none()

    def _select_recent(self, owner: str | Sequence[str] | None, status: TaskStatus | None,
                       limit: int) -> list[Row[Any]]:
        query = select(*TASK_SUMMARY).where(tasks.c.parent_id.is_(None))
        if isinstance(owner, str):
            query = query.where(tasks.c.owner == owner)
        elif owner is not None:
            query = query.where(tasks.c.owner.in_(list(owner)))
        if status is not None:
            query = query.where(tasks.c.status == status.value)
        query = query.order_by(tasks.c.created_at.desc()).limit(limit)
        with self._db.reading() as conn:
            return list(conn.execute(query).all())

    def _cancel(self, task_id: str, owner: str) -> tuple[TaskRecord, list[str]]:
        now = time.time()
        with self._db.writing() as conn:
            mine = (tasks.c.id == task_id) & (tasks.c.owner == owner) & tasks.c.parent_id.is_(None)
            row = conn.execute(select(*TASK_SUMMARY).where(mine)).first()
            if row is None:
                raise TaskNotFound(f"no task {task_id!r}")
            record = TaskRecord.from_row(row._mapping)
            if record.status.finished:
                raise TaskAlreadyFinished(f"task {task_id} is already {record.status.value}")
            cancelled = {"status": TaskStatus.CANCELLED.value, "finished_at": now, "error": "cancelled",
                         "dedupe_key": None, "lease_expires_at": None, "progress": None}
            active = tasks.c.status.in_(ACTIVE_STATUSES)
            conn.execute(update(tasks).where((tasks.c.id == task_id) | (tasks.c.parent_id == task_id), active)
                         .values(**cancelled))
            if record.status is TaskStatus.AWAITING_APPROVAL:
                withdraw_in(conn, task_id, now)
            shard_ids = _shard_ids(conn, record)
            self.feed.notify(conn, task_id, *shard_ids)
        stopped = replace(record, status=TaskStatus.CANCELLED, finished_at=now, error="cancelled", progress=None)
        return stopped, shard_ids


def _task_values(
    owner: str, kind: ScanKind, target: str, argv: Sequence[str], time_limit: int, *, pool: str, share: bool,
    shards: Sequence[Shard], address_count: int, probe_count: int, forced: bool, engagement: str | None = None,
    awaiting: bool = False,
) -> dict[str, Any]:
    """The row of a new top-level task (`awaiting`: it waits for a person's yes)."""
    status = TaskStatus.AWAITING_APPROVAL if awaiting else TaskStatus.QUEUED
    call_key = dedupe_key(owner, kind, argv, engagement)
    return {
        "id": str(uuid.uuid4()), "owner": owner, "kind": kind.value, "target": target,
        "argv": json.dumps(list(argv)), "status": status.value, "created_at": time.time(),
        "time_limit": time_limit, "pool": pool, "shard_count": len(shards), "parent_id": None,
        "dedupe_key": call_key if share else None, "call_key": call_key,
        "address_count": address_count, "probe_count": probe_count, "forced": forced, "engagement": engagement,
    }


def _admit(conn: Connection, values: dict[str, Any], fresh_since: float | None, shards: Sequence[Shard],
           limits: Limits | None, max_queued: int, engagement_probes: int | None) -> Row[Any] | None:
    """The task a new one (`values`) shares, when it may share one; else None once it passes
    the owner's limits, its engagement's probes per day and the queue's bound (RateLimited,
    QueueFull otherwise)."""
    if values["dedupe_key"] is not None:
        shared = _select_shareable(conn, values, fresh_since)
        if shared is not None:
            return shared
    check_submission(conn, values, limits, max_queued=max_queued, new_tasks=max(len(shards), 1))
    if engagement_probes is not None:
        check_engagement_probes(conn, values, engagement_probes)
    return None


def _select_shareable(conn: Connection, values: dict[str, Any], fresh_since: float | None) -> Row[Any] | None:
    active = conn.execute(_ACTIVE_TWIN, {"p_dedupe_key": values["dedupe_key"]}).first()
    if active is not None or fresh_since is None:
        return active
    return conn.execute(FRESH_TWIN, {"p_call_key": values["call_key"], "p_owner": values["owner"],
                                     "p_fresh_since": fresh_since}).first()


def _shard_rows(parent: dict[str, Any], shards: Sequence[Shard]) -> list[dict[str, Any]]:
    """A row per shard: its parent's, with its own argv and its own addresses and probes (limits
    count only the parent; run_history reads a shard's pace from its own)."""
    return [
        parent | {"id": str(uuid.uuid4()), "target": shard.target, "argv": json.dumps(shard.argv),
                  "parent_id": parent["id"], "shard_count": 0, "dedupe_key": None, "call_key": None,
                  "created_at": parent["created_at"] + index * 1e-6,
                  "address_count": scanned_addresses(shard.argv), "probe_count": probes(shard.argv)}
        for index, shard in enumerate(shards)
    ]


def _partial_result(record: TaskRecord, found: Found) -> ScanResult | None:
    """A partial result from what `_select_found` read; None when it holds nothing. It counts
    the addresses the task asked nmap to scan, and the time since it started."""
    hosts = [stored_host(data) for data in found.hosts]
    addresses = scanned_addresses(record.argv)
    elapsed_s = (record.finished_at or time.time()) - (record.started_at or record.created_at)
    if not record.shard_count:
        return build_result(record.target, hosts, RunStats.so_far(hosts, addresses, elapsed_s),
                            complete=False) if hosts else None
    parts = [assembled(result) for result in found.shards]
    if hosts:
        parts.append(build_result(record.target, hosts, RunStats.so_far(hosts, 0, 0.0), complete=False))
    if not parts:
        return None
    merged = merge_results(record.target, parts, elapsed_s)
    return merged.model_copy(update={"partial": True, "hosts_total": max(addresses, merged.hosts_total)})


def _with_shard_progress(conn: Connection, record: TaskRecord) -> TaskRecord:
    """A sharded task that has not finished, with its shards' progress; any other as it is."""
    if not record.shard_count or record.status.finished:
        return record
    rows = conn.execute(select(tasks.c.status, tasks.c.progress).where(tasks.c.parent_id == record.id)).all()
    return replace(record, progress=shards_progress([
        (TaskStatus(status), Progress.model_validate_json(progress) if progress else None) for status, progress in rows
    ]))


def _shard_ids(conn: Connection, record: TaskRecord) -> list[str]:
    if not record.shard_count:
        return []
    return list(conn.execute(select(tasks.c.id).where(tasks.c.parent_id == record.id)).scalars())


def _delete_finished_tasks(conn: Connection, before: float, batch: int) -> int:
    old = conn.execute(select(tasks.c.id).where(
        tasks.c.parent_id.is_(None), tasks.c.status.not_in(ACTIVE_STATUSES),
        tasks.c.finished_at < before).limit(batch)).scalars().all()
    family = (tasks.c.id.in_(old)) | (tasks.c.parent_id.in_(old))
    ids = conn.execute(select(tasks.c.id).where(family)).scalars().all()
    conn.execute(task_hosts.delete().where(task_hosts.c.task_id.in_(ids)))
    delete_found(conn, ids)
    conn.execute(approvals.delete().where(approvals.c.task_id.in_(old)))
    conn.execute(tasks.delete().where(family))
    return len(old)
