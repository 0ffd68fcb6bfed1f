"""What workers do to tasks: claim, start, progress, finish; the leases that prove a worker
still runs what it claimed, and the workers table list_workers reads.

A task is claimed by one guarded statement that gives a worker a lease, marked started just
before nmap starts, and finished by a guarded update (the verdict). A completed scan's verdict
marks it pending a fold into the inventory, which runs after the commit in short transactions
of a batch of hosts each (inventory_store.fold_next): by the worker that wrote the verdict, at
once, before it tells a waiting call; by any process once that worker stopped folding it
(`fold_stale`). A waiting call returns once the fold is done (TaskRecord.folding).

A task whose lease expired is resolved by any process: queued again if nmap never
started; if it had, a shard is queued again for another worker of its pool (its parent runs
on; at most MAX_SHARD_REQUEUES times) and any other task is interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import BindParameter, ColumnElement, Connection, bindparam, delete, func, insert, select, update
from sqlalchemy.sql.dml import ReturningUpdate

from change_feed import ChangeFeed, queue_key
from db import Database, DatabaseUnavailable
from findings import ScanOutcome
from inventory_store import (
    FOLD_BATCH_HOSTS,
    FoldStep,
    InventoryRefused,
    abandon_fold,
    fold_next,
    fold_now,
    next_fold_order,
    stale_fold_owners,
    take_fold_turn,
)
from models import (
    ACTIVE_STATUSES,
    TASK_SUMMARY,
    HostDetail,
    Progress,
    TaskRecord,
    TaskStatus,
    WorkerInfo,
    stored_result,
    task_hosts,
    tasks,
    workers,
)
from result_store import Encoded, adopt_shards, encoded, write_found
from scanner import scanned_addresses
from sharding import PoolCapacity, ShardEnd, parent_verdict

logger = logging.getLogger(__name__)

INTERRUPTED_ERROR = "the worker running this scan stopped before it finished; submit it again"
# A shard whose worker stopped mid-scan runs again this many times at most: a shard that took
# down its worker that often is more likely the cause than the victim, and is interrupted.
MAX_SHARD_REQUEUES = 2
# The longest a SQLite writer waiting for the lock sleeps between tries (its busy handler's
# last step). Its waiters queue in no order: a fold that began its next batch as soon as it
# committed one kept a submit waiting for the whole of a 5,000-host fold (1.8 s of 2.0 s), as the
# submit slept through every gap. A pause as long as the batch took, up to this, lets them in.
SQLITE_BUSY_RETRY_SECONDS = 0.1
_UNCLAIMED = {"status": TaskStatus.QUEUED.value, "worker_id": None, "worker_name": None,
              "claimed_at": None, "lease_expires_at": None}

# ---- the statements every scan runs, built once ------------------------------------------
# Building a SQLAlchemy statement and its cache key costs several times more than running it
# (measured: a task read built per call 185 us, the same read built once 22 us, SQLite), and a
# scan runs a dozen of them; so these are built here, with bound parameters named `p_*`
# (never a column's name: those are the SET clause's).
_P: dict[str, BindParameter[str]] = {name: bindparam(f"p_{name}") for name in ("id", "worker", "pool", "parent")}
_OURS = (tasks.c.id == _P["id"]) & (tasks.c.worker_id == _P["worker"])
_RUNNING_OURS = _OURS & (tasks.c.status == TaskStatus.RUNNING.value)
_STILL_OURS = select(tasks.c.id).where(_RUNNING_OURS)
# The next queued tasks, in fair turns: each owner's turn is its nmap processes already running
# in the pool (shards count, each is one) plus its place in its own queue, so an owner with
# nothing running goes before one with a backlog, and within one owner the oldest goes first.
# One owner's queue thus delays another's task by at most the scan in a slot when it arrives.
_RUNNING_PER_OWNER = (
    select(tasks.c.owner, func.count().label("running"))
    .where(tasks.c.status == TaskStatus.RUNNING.value, tasks.c.pool == _P["pool"], tasks.c.shard_count == 0)
    .group_by(tasks.c.owner).subquery("running_per_owner")
)


def _claim_statement(*only: ColumnElement[bool]) -> ReturningUpdate[Any]:
    """The claim of the pool's next queued tasks, among those that also meet `only`."""
    queued_turns = (
        select(tasks.c.id, tasks.c.created_at, (
            func.coalesce(_RUNNING_PER_OWNER.c.running, 0)
            + func.row_number().over(partition_by=tasks.c.owner, order_by=(tasks.c.created_at, tasks.c.id))
        ).label("turn"))
        .select_from(tasks.outerjoin(_RUNNING_PER_OWNER, _RUNNING_PER_OWNER.c.owner == tasks.c.owner))
        .where(tasks.c.status == TaskStatus.QUEUED.value, tasks.c.pool == _P["pool"], tasks.c.shard_count == 0, *only)
        .subquery("queued_turns")
    )
    # Chosen once: PostgreSQL may run an `IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)` subquery
    # again per row it updates, each time skipping the rows it just locked, and so claim more than
    # n (seen: 4 scans on 2 slots). A MATERIALIZED CTE runs once. The turns are counted in a
    # subquery because FOR UPDATE cannot lock rows of a query with a window function.
    next_queued = (
        select(tasks.c.id)
        .join(queued_turns, queued_turns.c.id == tasks.c.id)
        .where(tasks.c.status == TaskStatus.QUEUED.value)
        .order_by(queued_turns.c.turn, queued_turns.c.created_at, tasks.c.id).limit(bindparam("p_limit"))
        .with_for_update(of=tasks, skip_locked=True)
        .cte("next_queued").prefix_with("MATERIALIZED")
    )
    return (
        update(tasks)
        .where(tasks.c.id == next_queued.c.id, tasks.c.status == TaskStatus.QUEUED.value)
        .values(status=TaskStatus.RUNNING.value)
        .returning(*TASK_SUMMARY)
    )


_CLAIM = _claim_statement()
# A worker bound to one owner (a --stdio process's: server.Runtime says why) claims only its tasks.
_CLAIM_OWN = _claim_statement(tasks.c.owner == bindparam("p_owner"))
_CLAIM_PARENT = update(tasks).where(tasks.c.id == _P["parent"], tasks.c.status == TaskStatus.QUEUED.value) \
    .values(status=TaskStatus.RUNNING.value)
# Start, progress and verdict of a scan this worker runs; what they set is in their parameters.
_UPDATE_RUNNING_OURS = update(tasks).where(_RUNNING_OURS)
# The verdict returns the row it wrote: a waiting call in this process needs no read of it.
_RECORD_VERDICT = _UPDATE_RUNNING_OURS.returning(*TASK_SUMMARY)
_MARK_PARENT_STARTED = update(tasks).where(tasks.c.id == _P["parent"], tasks.c.started_at.is_(None))
_INSERT_LIVE_HOSTS = insert(task_hosts)
_KEEP_FOUND = update(tasks).where(_OURS, tasks.c.status == TaskStatus.CANCELLED.value, tasks.c.result.is_(None))
_DELETE_LIVE_HOSTS = delete(task_hosts).where(task_hosts.c.task_id == _P["id"])
_DELETE_UNCONFIRMED = delete(task_hosts).where(task_hosts.c.task_id == _P["id"], task_hosts.c.seq < 0)
# Any shard of a parent not finished yet.
_SHARDS_RUNNING = select(tasks.c.id).where(tasks.c.parent_id == _P["parent"],
                                           tasks.c.status.in_(ACTIVE_STATUSES)).limit(1)
# A pool's live workers that may take an owner's scans (any owner's, or that owner's alone: a
# --stdio process's), their slots and what they run (ix_workers_pool_heartbeat alone).
_POOL_CAPACITY = select(func.count(), func.coalesce(func.sum(workers.c.capacity), 0),
                        func.coalesce(func.sum(workers.c.running), 0)).where(
    workers.c.pool == _P["pool"], workers.c.heartbeat_at >= bindparam("p_since"),
    workers.c.owner.is_(None) | (workers.c.owner == bindparam("p_owner")))
# Running tasks (not a sharded parent, which has no lease of its own) whose lease has expired.
_EXPIRED_LEASES = select(tasks.c.id, func.coalesce(tasks.c.lease_expires_at, 0.0).label("lease")).where(
    tasks.c.status == TaskStatus.RUNNING.value, tasks.c.shard_count == 0,
    func.coalesce(tasks.c.lease_expires_at, 0.0) < bindparam("p_now")).with_for_update()


@dataclass(frozen=True)
class PoolStatus:
    """A pool as list_workers shows it."""

    pool: str
    queued: int
    workers: list[dict[str, Any]]
    running: int = 0


def claim_in(conn: Connection, worker: WorkerInfo, pool: str, limit: int, now: float,
             lease_seconds: float) -> list[TaskRecord]:
    """In `conn`'s transaction: up to `limit` of the pool's queued tasks (of the worker's owner
    alone when it has one), in fair turns across owners (see _claim_statement), now leased to
    `worker`, oldest first (a shard's parent is
    marked running with its first shard)."""
    claim, only = (_CLAIM, {}) if worker.owner is None else (_CLAIM_OWN, {"p_owner": worker.owner})
    rows = conn.execute(claim, {"p_pool": pool, "p_limit": limit, "worker_id": worker.id,
                                "worker_name": worker.name, "claimed_at": now,
                                "lease_expires_at": now + lease_seconds, **only}).all()
    records = sorted((TaskRecord.from_row(row._mapping) for row in rows), key=lambda record: record.created_at)
    for parent_id in sorted({record.parent_id for record in records if record.parent_id}):
        conn.execute(_CLAIM_PARENT, {"p_parent": parent_id, "claimed_at": now})
    return records


def settle_parent(conn: Connection, feed: ChangeFeed, parent_id: str) -> int | None:
    """Once every shard has finished, give the parent its verdict and its result: the shards'
    heads merged, their hosts moved under it (result_store.adopt_shards: nothing is parsed
    but the heads, and the hosts are stored once). The parent's place among its owner's
    pending folds when a shard's fold is still pending (the parent is then folding until the
    folds before it are done), else None."""
    # Locking the parent row serialises shards finishing at the same moment; the owner's fold
    # turn is taken first, as a fold's last batch takes it before the parent's row.
    owner = conn.execute(select(tasks.c.owner).where(tasks.c.id == parent_id)).scalar_one()
    take_fold_turn(conn, owner)
    parent = TaskRecord.from_row(conn.execute(select(*TASK_SUMMARY).where(tasks.c.id == parent_id)
                                              .with_for_update()).one()._mapping)
    if parent.status.finished:
        return None
    # Every shard's verdict asks; only the last one reads (and parses) the shards' heads:
    # reading them at each verdict made a scan's cost grow with the square of its shards.
    if conn.execute(_SHARDS_RUNNING, {"p_parent": parent_id}).first() is not None:
        return None
    shards = conn.execute(select(tasks.c.id, tasks.c.status, tasks.c.result, tasks.c.error, tasks.c.fold_order)
                          .where(tasks.c.parent_id == parent_id).order_by(tasks.c.created_at)).all()
    now = time.time()
    verdict = parent_verdict(parent.target, now - (parent.started_at or parent.created_at), [
        ShardEnd(TaskStatus(s.status), stored_result(s.result) if s.result else None, s.error)
        for s in shards], scanned_addresses(parent.argv))
    if verdict is None:
        return None
    hosts = adopt_shards(conn, parent_id, [s.id for s in shards if s.result])
    # A shard still to be folded keeps its head (its fold reads its scan's scope and ports
    # there, and drops it); the parent waits for its shards' folds (TaskRecord.folding).
    conn.execute(update(tasks).where(tasks.c.parent_id == parent_id, tasks.c.fold_order.is_(None))
                 .values(result=None, result_hosts=None))
    fold_order = next_fold_order(conn, owner) if any(s.fold_order is not None for s in shards) else None
    conn.execute(update(tasks).where(tasks.c.id == parent_id).values(
        status=verdict.status.value, finished_at=now, error=verdict.error, dedupe_key=None,
        result=verdict.result.model_dump_json() if verdict.result else None,
        result_hosts=hosts if verdict.result else None, fold_order=fold_order,
    ))
    feed.notify(conn, parent_id)
    return fold_order


class WorkerStore:
    """The tasks as workers see them: claimed, leased, run, finished."""

    def __init__(self, db: Database, feed: ChangeFeed, *, lease_seconds: float = 30.0) -> None:
        self._db = db
        self.feed = feed
        self.lease_seconds = lease_seconds
        # Tasks this process may have written finished hosts of (see `save_live`): only
        # their verdict needs to delete those rows, a statement saved for every other scan.
        self._live_hosts_of: set[str] = set()

    async def register(self, worker: WorkerInfo) -> None:
        await self._db.run(self._beat_worker, worker, 0)

    async def unregister(self, worker_id: str) -> None:
        await self._db.run(self._delete_worker, worker_id)

    async def claim(self, worker: WorkerInfo, pool: str, limit: int) -> list[TaskRecord]:
        """Up to `limit` of the pool's queued tasks in fair turns across owners, now leased to
        `worker`; fewer (or none) when the queue holds fewer."""
        return await self._db.run(self._claim, worker, pool, limit)

    async def mark_started(self, record: TaskRecord, worker: WorkerInfo) -> bool:
        """Record that the worker's nmap is about to start (when, and which nmap); False when
        the task is no longer ours."""
        return await self._db.run(self._mark_started, record, worker)

    async def release(self, record: TaskRecord, worker_id: str) -> None:
        """Give back a task we claimed but never started: it is queued again."""
        await self._db.run(self._release, record, worker_id)
        self.feed.publish(*record.keys, queue_key(record.pool))

    async def save_live(
        self, record: TaskRecord, worker_id: str, progress: Progress | None, first_seq: int, hosts: list[HostDetail],
        unconfirmed: list[HostDetail] | None = None,
    ) -> None:
        """Write a running scan's progress, the hosts it finished since the last call and,
        unless None (unchanged), the hosts it is still scanning with the open ports nmap
        announced on them, in place of those written before. Only the worker holding a task
        writes its hosts, from its start: the task is noted before the write, which may
        commit even when its answer is lost."""
        if hosts or unconfirmed:
            self._live_hosts_of.add(record.id)
        await self._db.run(self._save_live, record.id, worker_id, progress, first_seq, hosts, unconfirmed)
        self.feed.publish(*record.keys)

    async def finish(self, record: TaskRecord, worker_id: str, outcome: ScanOutcome) -> bool:
        """Record how the scan ended, then fold a completed scan into the inventory before telling
        a waiting call (which returns once it is folded, whichever process waits). False when the
        task was no longer ours to finish (it was cancelled, then only what it found is kept; or
        resolved by another process)."""
        # No deadline: compressing aside, a big result's chunks are many rows to write, nobody but
        # this worker waits on it, and a stalled database only delays it.
        verdict, through = await self._db.run(self._finish, record, worker_id, outcome,
                                              record.id in self._live_hosts_of, deadline=False)
        self._live_hosts_of.discard(record.id)
        if through is not None and await self.fold(record.owner, through) and verdict is not None:
            verdict = replace(verdict, folding=False)
        if verdict is None or record.parent_id:
            self.feed.publish(*record.keys)
        else:
            self.feed.publish_verdict(verdict)
        return verdict is not None

    async def fold(self, owner: str, through: int | None = None) -> bool:
        """Fold the owner's pending folds, in their order, through the one placed at `through`
        (all when None), a batch per transaction; a fold another process runs meanwhile is
        taken in turns with it, batch by batch. False when the database stopped answering:
        the rest is folded later by any process (`fold_stale`)."""
        try:
            while True:
                started = time.monotonic()
                if (step := await self._fold_step(owner, through)) is None:
                    break
                if step.done:
                    self.feed.publish(*step.keys)
                    if through is not None and step.order >= through:
                        break
                if self._db.dialect == "sqlite":
                    await asyncio.sleep(min(time.monotonic() - started, SQLITE_BUSY_RETRY_SECONDS))
        except DatabaseUnavailable:
            logger.warning("the inventory fold of a completed scan waits for the task database")
            return False
        return True

    async def fold_stale(self) -> None:
        """Fold what a process that stopped (or lost the database) left pending: every owner's
        folds whose lease ran out, each owner's in their order."""
        for owner in await self._db.run(self._stale_fold_owners):
            await self.fold(owner)

    async def _fold_step(self, owner: str, through: int | None) -> FoldStep | None:
        try:
            # No deadline, as for the verdict: a batch is bounded, and a stalled database only delays it.
            return await self._db.run(self._fold_next, owner, through, deadline=False)
        except InventoryRefused as e:
            logger.exception("task %s: its result could not be added to the inventory", e.task_id)
            await self._db.run(self._abandon_fold, e.task_id)
            return FoldStep(e.task_id, 0, (e.task_id,), True)

    def _fold_next(self, owner: str, through: int | None) -> FoldStep | None:
        with self._db.writing() as conn:
            step = fold_next(conn, owner, self.lease_seconds, through)
            if step is not None and step.done:
                self.feed.notify(conn, *step.keys)
        return step

    def _abandon_fold(self, task_id: str) -> None:
        with self._db.writing() as conn:
            abandon_fold(conn, task_id)
            self.feed.notify(conn, task_id)

    def _stale_fold_owners(self) -> list[str]:
        with self._db.reading() as conn:
            return stale_fold_owners(conn, time.time())

    async def renew(self, worker: WorkerInfo, task_ids: Sequence[str]) -> set[str]:
        """Extend this worker's leases and heartbeat; return the ids no longer ours."""
        return await self._db.run(self._renew, worker, list(task_ids))

    async def still_ours(self, task_id: str, worker_id: str) -> bool:
        return await self._db.run(self._still_ours, task_id, worker_id)

    async def resolve_expired(self, suspects: Mapping[str, float]) -> dict[str, float]:
        """Resolve the tasks whose lease has expired and had already expired, unchanged, at the
        previous call (`suspects`: task id -> its lease then): queued again if nmap never started
        or, for a shard with requeues left, if it had; else interrupted. Seen twice, a reaper's
        pause apart, so that a renewal the database held back (a lock, a freeze) lands before
        its lease is judged. The tasks whose lease has expired now, for the next call."""
        expired, requeued, interrupted = await self._db.run(self._resolve_expired, dict(suspects))
        if requeued or interrupted:
            self.feed.wake_all()
        return expired

    async def capacity(self, pool: str, owner: str) -> PoolCapacity:
        """The pool's workers alive (a heartbeat within a lease, as list_workers counts them)
        that may run `owner`'s scans, their slots and the nmap runs they reported: what a
        scan's shards are sized by at submit, in any process, one with no worker of its own
        included. A --stdio process's worker takes only its caller's scans: it counts for its
        caller alone, where it once made another token's scans split over a worker that
        would never claim a shard of them."""
        return await self._db.run(self._select_capacity, pool, owner)

    async def pools(self, stale_after_s: float) -> list[PoolStatus]:
        """Per pool: its workers (alive when they beat within `stale_after_s`) and its queue."""
        return await self._db.run(self._select_pools, stale_after_s)

    def _claim(self, worker: WorkerInfo, pool: str, limit: int) -> list[TaskRecord]:
        """No notification: nobody waits for a claim (a waiting call wakes for progress and
        the verdict, a worker for losing its task), and one per scan costs every waiter a read."""
        with self._db.writing() as conn:
            self._db.relaxed_commit(conn)
            return claim_in(conn, worker, pool, limit, time.time(), self.lease_seconds)

    def _mark_started(self, record: TaskRecord, worker: WorkerInfo) -> bool:
        """Not notified either, for the reason `_claim` gives."""
        now = time.time()
        with self._db.writing() as conn:
            started = conn.execute(_UPDATE_RUNNING_OURS, {
                "p_id": record.id, "p_worker": worker.id, "started_at": now,
                "nmap_version": worker.nmap_version, "nmap_platform": worker.nmap_platform,
            }).rowcount == 1
            if started and record.parent_id:
                conn.execute(_MARK_PARENT_STARTED, {"p_parent": record.parent_id, "started_at": now})
        return started

    def _release(self, record: TaskRecord, worker_id: str) -> None:
        """Other processes' workers hear of the task queued again (their idle re-check is rare)."""
        with self._db.writing() as conn:
            released = conn.execute(
                update(tasks).where(tasks.c.id == record.id, tasks.c.worker_id == worker_id,
                                    tasks.c.status == TaskStatus.RUNNING.value, tasks.c.started_at.is_(None))
                .values(**_UNCLAIMED)
            ).rowcount
            if released:
                self.feed.notify(conn, *record.keys, queue_key(record.pool))

    def _save_live(
        self, task_id: str, worker_id: str, progress: Progress | None, first_seq: int, hosts: list[HostDetail],
        unconfirmed: list[HostDetail] | None,
    ) -> None:
        with self._db.writing() as conn:
            ours = conn.execute(_UPDATE_RUNNING_OURS, {
                "p_id": task_id, "p_worker": worker_id, "progress": progress.model_dump_json() if progress else None,
            }).rowcount == 1
            # In one transaction: a reader never sees a host both finished and still scanned.
            rows = [(first_seq + i, host) for i, host in enumerate(hosts)]
            if ours and unconfirmed is not None:
                conn.execute(_DELETE_UNCONFIRMED, {"p_id": task_id})
                rows += [(-1 - i, host) for i, host in enumerate(unconfirmed)]
            if ours and rows:
                conn.execute(_INSERT_LIVE_HOSTS, [
                    {"task_id": task_id, "seq": seq, "data": host.model_dump_json()} for seq, host in rows
                ])
            self.feed.notify(conn, task_id)

    def _finish(self, record: TaskRecord, worker_id: str, outcome: ScanOutcome,
                live_hosts: bool) -> tuple[TaskRecord | None, int | None]:
        """The task as the verdict wrote it (None when it was no longer ours), and the place of
        the last fold the verdict left pending, its own or (a sharded scan's last shard) its
        parent's; None when none is. `live_hosts`: this process may have written finished
        hosts of the task, which a result replaces.

        A result of one batch of hosts at most, with none of its owner's folds pending before
        it, is folded in the verdict's transaction, from memory (a quick scan's, as a rule): no
        other writer waits longer than for a batch, and no transaction more is needed. Should
        the database refuse what that fold writes (a bug), the verdict is written again with
        its fold pending, which the fold after it gives up."""
        found = encoded(record.id, outcome)
        try:
            return self._write_verdict(record, worker_id, outcome, found, live_hosts, now_if_small=True)
        except InventoryRefused:
            return self._write_verdict(record, worker_id, outcome, found, live_hosts, now_if_small=False)

    def _write_verdict(self, record: TaskRecord, worker_id: str, outcome: ScanOutcome, found: Encoded,
                       live_hosts: bool, *, now_if_small: bool) -> tuple[TaskRecord | None, int | None]:
        ours = {"p_id": record.id, "p_worker": worker_id}
        result = outcome.result if outcome.status is TaskStatus.COMPLETED else None
        with self._db.writing() as conn:
            # Placed before the verdict's UPDATE: the owner's turn, held to the commit, orders it.
            fold_order = next_fold_order(conn, record.owner) if result is not None else None
            # Once the database answers: a verdict that waited out a freeze finished after it.
            finished_at = time.time()
            small = now_if_small and fold_order == 1 and result is not None and outcome.hosts.count <= FOLD_BATCH_HOSTS
            pending = {"fold_order": fold_order, "fold_after": None,
                       "fold_lease": time.time() + self.lease_seconds} if result is not None and not small else {}
            row = conn.execute(_RECORD_VERDICT, ours | found.columns | pending | {
                "status": outcome.status.value, "finished_at": finished_at, "error": outcome.error,
                "progress": None, "dedupe_key": None, "lease_expires_at": None,
            }).first()
            finished = row is not None
            # Cancelled while it ran: keep what it found, not the verdict.
            if finished or conn.execute(_KEEP_FOUND, ours | found.columns).rowcount == 1:
                write_found(conn, found)
            if live_hosts and outcome.result is not None:
                conn.execute(_DELETE_LIVE_HOSTS, {"p_id": record.id})
            # A small result whose scope holds more known hosts than a batch reads: the rest of
            # its fold is left pending, as a big one's.
            left = small and finished and result is not None and not fold_now(
                conn, record, result.model_copy(update={"hosts": outcome.hosts.hosts()}), finished_at,
                self.lease_seconds)
            through = fold_order if finished and (pending or left) else None
            if record.parent_id:
                through = settle_parent(conn, self.feed, record.parent_id) or through
            self.feed.notify(conn, *record.keys)
        verdict = TaskRecord.from_row(row._mapping) if row is not None else None
        return (replace(verdict, folding=True) if verdict is not None and left else verdict), through

    def _renew(self, worker: WorkerInfo, task_ids: list[str]) -> set[str]:
        with self._db.writing() as conn:
            self._db.relaxed_commit(conn)
            _beat_worker_in(conn, worker, len(task_ids))
            if not task_ids:
                return set()
            ours = (tasks.c.worker_id == worker.id) & (tasks.c.status == TaskStatus.RUNNING.value)
            # The lease runs from now, as late as it can be taken: not from before a wait for
            # the database (the heartbeat renews again at once after a slow renewal).
            conn.execute(update(tasks).where(ours, tasks.c.id.in_(task_ids))
                         .values(lease_expires_at=time.time() + self.lease_seconds))
            still = set(conn.execute(select(tasks.c.id).where(ours, tasks.c.id.in_(task_ids))).scalars())
        return set(task_ids) - still

    def _still_ours(self, task_id: str, worker_id: str) -> bool:
        with self._db.reading() as conn:
            return conn.execute(_STILL_OURS, {"p_id": task_id, "p_worker": worker_id}).first() is not None

    def _resolve_expired(self, suspects: dict[str, float]) -> tuple[dict[str, float], list[str], list[str]]:
        now = time.time()
        with self._db.writing() as conn:
            # Locked: a renewal under way commits first, and none changes them until the end.
            expired = {row.id: row.lease for row in conn.execute(_EXPIRED_LEASES, {"p_now": now})}
            confirmed = [task_id for task_id, lease in expired.items() if suspects.get(task_id) == lease]
            judged = tasks.c.id.in_(confirmed) & (tasks.c.status == TaskStatus.RUNNING.value)
            requeued = conn.execute(
                update(tasks).where(judged, tasks.c.started_at.is_(None)).values(**_UNCLAIMED)
                .returning(tasks.c.id, tasks.c.pool)
            ).all()
            rerun = _requeue_started_shards(conn, judged)
            interrupted = conn.execute(
                update(tasks).where(judged, tasks.c.started_at.is_not(None))
                .values(status=TaskStatus.INTERRUPTED.value, finished_at=now, error=INTERRUPTED_ERROR,
                        dedupe_key=None, lease_expires_at=None, progress=None)
                .returning(tasks.c.id, tasks.c.parent_id)
            ).all()
            for parent_id in sorted({row.parent_id for row in interrupted if row.parent_id}):
                settle_parent(conn, self.feed, parent_id)
            self.feed.notify(conn, *(row.id for row in interrupted),
                             *(queue_key(row.pool) for row in [*requeued, *rerun]))
            conn.execute(delete(workers).where(workers.c.heartbeat_at < now - 10 * self.lease_seconds))
        if rerun:
            logger.warning("%d shard(s) whose worker stopped mid-scan queued again", len(rerun))
        if interrupted:
            logger.warning("%d task(s) whose worker stopped mid-scan marked interrupted", len(interrupted))
        return ({task_id: lease for task_id, lease in expired.items() if task_id not in confirmed},
                [row.id for row in [*requeued, *rerun]], [row.id for row in interrupted])

    def _beat_worker(self, worker: WorkerInfo, running: int) -> None:
        with self._db.writing() as conn:
            _beat_worker_in(conn, worker, running)

    def _delete_worker(self, worker_id: str) -> None:
        with self._db.writing() as conn:
            conn.execute(delete(workers).where(workers.c.id == worker_id))

    def _select_capacity(self, pool: str, owner: str) -> PoolCapacity:
        with self._db.reading() as conn:
            alive, slots, running = conn.execute(_POOL_CAPACITY, {
                "p_pool": pool, "p_owner": owner, "p_since": time.time() - self.lease_seconds}).one()
        return PoolCapacity(workers=alive, slots=slots, running=running)

    def _select_pools(self, stale_after_s: float) -> list[PoolStatus]:
        now = time.time()
        with self._db.reading() as conn:
            counts: dict[str, dict[str, int]] = defaultdict(dict)
            for pool, status, count in conn.execute(
                select(tasks.c.pool, tasks.c.status, func.count())
                .where(tasks.c.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value]),
                       tasks.c.shard_count == 0).group_by(tasks.c.pool, tasks.c.status)
            ):
                counts[status][pool] = count
            queued, running = counts[TaskStatus.QUEUED.value], counts[TaskStatus.RUNNING.value]
            rows = conn.execute(select(workers).order_by(workers.c.pool, workers.c.name)).all()
        by_pool: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            by_pool[row.pool].append({
                "name": row.name, "capacity": row.capacity, "running": row.running,
                "heartbeat_at": row.heartbeat_at, "alive": now - row.heartbeat_at <= stale_after_s,
            })
        return [PoolStatus(pool, queued.get(pool, 0), by_pool.get(pool, []), running.get(pool, 0))
                for pool in sorted({*queued, *running, *by_pool})]


def _requeue_started_shards(conn: Connection, judged: ColumnElement[bool]) -> list[Any]:
    """The shards among `judged` (leases confirmed expired) whose nmap had started, queued again
    as if never claimed while they have requeues left; their parent runs on. The hosts the
    stopped run stored go with it: the next run stores its own, and the parent's result would
    count them twice. Their ids and pools."""
    rerun = conn.execute(
        update(tasks).where(judged, tasks.c.started_at.is_not(None), tasks.c.parent_id.is_not(None),
                            tasks.c.requeues < MAX_SHARD_REQUEUES)
        .values(**_UNCLAIMED, started_at=None, progress=None, requeues=tasks.c.requeues + 1)
        .returning(tasks.c.id, tasks.c.pool)
    ).all()
    if rerun:
        conn.execute(delete(task_hosts).where(task_hosts.c.task_id.in_([row.id for row in rerun])))
    return list(rerun)


def _beat_worker_in(conn: Connection, worker: WorkerInfo, running: int) -> None:
    """Refresh the worker's row, or (first beat, or pruned while unreachable) insert it."""
    now = time.time()
    beat = conn.execute(update(workers).where(workers.c.id == worker.id)
                        .values(heartbeat_at=now, running=running)).rowcount
    if not beat:
        conn.execute(insert(workers).values(id=worker.id, name=worker.name, pool=worker.pool,
                                            capacity=worker.capacity, running=running, started_at=now,
                                            heartbeat_at=now, owner=worker.owner))
