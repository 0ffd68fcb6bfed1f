"""Scan workers: claim -> scan -> finish, leases renewed by a heartbeat, and shutdown.

A worker serves one pool and runs at most `capacity` nmap processes at once (one bound to an
owner, as a --stdio process's is, runs only that owner's tasks). It claims the
next queued tasks of its pool, in fair turns across their owners (worker_store), as many as
it has free slots (the claim gives it a lease); a call submitting in its process while a
slot is free makes that claim in the submitting transaction (`hand_over`). It checks each
task's argv against its own configuration and refuses one it would not have built
(argv_check); it marks each task started just before its nmap starts, writes progress,
finished hosts and the open ports nmap announces before it finishes their host as they come
(at most about once a second), and records the verdict. Its heartbeat renews the leases of
the scans it runs; a task it no longer holds (cancelled by a caller in any process, or
resolved elsewhere) has its nmap stopped within about a second, through the store's change
feed.

Shutdown, in order: stop claiming; give running scans `grace_seconds`; stop the rest, which
are recorded `interrupted` with the hosts they had finished; give back tasks claimed but not
yet started (they are queued again); leave the workers table.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import logs
from argv_check import ArgvCheck, TaskRefused
from change_feed import queue_key, wait_set
from db import SLOW_CALL_SECONDS, Database, DatabaseUnavailable
from findings import BUFFER_HOSTS, HostSpool, ReportSpool, ScanOutcome
from metrics import Metrics
from models import HostDetail, Progress, ScanKind, ScanResult, TaskRecord, TaskStatus, WorkerInfo
from nmap_report import Findings, ReportParser, clean_text, with_versions
from scanner import nmap_build, run_nmap, run_problem, scanned_addresses, version_argv
from supervisor import Supervisor
from task_manager import Submitted
from task_progress import DISCOVERY, VERSION_DETECTION, TaskProgress
from worker_store import WorkerStore

logger = logging.getLogger(__name__)

# An idle worker looks at the queue this often even when no change was heard of. Every change
# that queues a task notifies the queue's key in its transaction, and while the change feed
# cannot listen it wakes every waiter twice a second (change_feed.POLL_SECONDS): this look is
# for what no listener can notice, a notification lost on a connection that died silently
# until its TCP keepalives tell (change_feed.LISTEN_KEEPALIVE), or a task queued by a process
# of an older release. Every 5 s it cost each idle worker 12 write transactions a minute.
IDLE_RECHECK_SECONDS = 60.0
# Progress and finished hosts of a running scan are written at most this often.
LIVE_WRITE_SECONDS = 1.0
# A heartbeat that failed or was slow is tried again this soon (see Worker._heartbeat_loop).
RENEW_AGAIN_SECONDS = 1.0
# Retrying to record a verdict while the database is unreachable: first and longest pause.
RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS = 0.5, 5.0
SHUTDOWN_ERROR = "the worker shut down during the scan; submit it again"


class Worker:
    """One process's scan worker; see the module docstring."""

    def __init__(
        self, store: WorkerStore, check: ArgvCheck, *, name: str, pool: str, capacity: int, grace_seconds: float,
        sandbox: Sequence[str], version_seconds: float = 300.0, metrics: Metrics | None = None,
        owner: str | None = None, buffer_hosts: int = BUFFER_HOSTS,
    ) -> None:
        self.info = WorkerInfo(id=str(uuid.uuid4()), name=name, pool=pool, capacity=capacity, owner=owner)
        self._store = store
        # What a task may run is decided here again, not trusted from the database (argv_check).
        self._check = check
        # The commands every nmap runs under (sandbox.Sandbox.prefix).
        self._sandbox = tuple(sandbox)
        self._metrics = metrics or Metrics()
        self._grace_s = grace_seconds
        # The time bound of a full scan's second phase, version detection.
        self._version_seconds = version_seconds
        # Hosts a scan holds parsed before compressing them (findings.HostSpool).
        self._buffer_hosts = buffer_hosts
        self._slots = asyncio.Semaphore(capacity)
        self._runs: dict[str, asyncio.Task[None]] = {}
        # Tasks whose lease the heartbeat renews: claimed and not yet done scanning.
        self._holding: set[str] = set()
        self._shutdown = asyncio.Event()
        self._stopping = False
        self._loops: list[asyncio.Task[None]] = []
        # Where runs handed over by a submitting call start: the worker's own context, not
        # the call's (whose token would ride on every log line of the scan).
        self._context = contextvars.copy_context()

    async def start(self, supervisor: Supervisor) -> None:
        """Learn which nmap this worker runs (each task it starts records it), join the
        workers table and start claiming, `supervisor` watching the loops."""
        version, platform = await nmap_identity(self._check.nmap_path, self._sandbox)
        self.info = replace(self.info, nmap_version=version, nmap_platform=platform)
        await self._store.register(self.info)
        self._loops = [supervisor.start("claim", self._claim_loop()),
                       supervisor.start("heartbeat", self._heartbeat_loop())]

    async def stop(self) -> None:
        """Shut down in the order the module docstring gives."""
        self._stopping = True
        claim = self._loops[0] if self._loops else None
        if claim is not None:
            claim.cancel()
            await asyncio.gather(claim, return_exceptions=True)
        runs = list(self._runs.values())
        if runs:
            await asyncio.wait(runs, timeout=self._grace_s)
        self._shutdown.set()
        await asyncio.gather(*self._runs.values(), return_exceptions=True)
        for loop in self._loops[1:]:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        with contextlib.suppress(DatabaseUnavailable):
            await self._store.unregister(self.info.id)

    async def wait_stopped(self, task_id: str, timeout_s: float) -> None:
        """Wait (up to `timeout_s`) until this worker no longer runs the task."""
        run = self._runs.get(task_id)
        if run is not None:
            await asyncio.wait([run], timeout=timeout_s)

    @property
    def running(self) -> int:
        return len(self._runs)

    async def hand_over(self, submit: Callable[[WorkerInfo | None], Awaitable[Submitted]]) -> Submitted:
        """Run `submit`, with this worker to claim for when it has a slot free: the task the
        submission claims runs here without a claim of its own (a transaction, and a wake-up
        of the claim loop, saved per scan). The slot is taken before the submission and given
        back if it claimed nothing; a caller cancelled meanwhile does not strand the task."""
        if self._stopping or self._slots.locked():
            return await submit(None)
        await self._slots.acquire()  # free, so it returns at once: the slot cannot be taken meanwhile
        submitting = asyncio.ensure_future(submit(self.info))
        submitting.add_done_callback(self._take_over, context=self._context)
        return await asyncio.shield(submitting)

    def _take_over(self, submitting: asyncio.Future[Submitted]) -> None:
        claimed = None if submitting.cancelled() or submitting.exception() else submitting.result().claimed
        if claimed is None:
            self._slots.release()
        else:
            self._start_run(claimed)

    # ---- claim -> scan -> finish --------------------------------------------------------

    async def _claim_loop(self) -> None:
        """Claim as many tasks as there are free slots, in one statement; a claim that comes
        back short means the queue is empty, so the loop sleeps until a task is queued (a
        claim per slot would cost a futile write transaction after every claimed scan)."""
        with self._store.feed.subscribe(queue_key(self.info.pool)) as queued:
            while True:
                free = await self._free_slots()
                queued.clear()
                records = await self._claim(free)
                for record in records:
                    self._start_run(record)
                for _ in range(free - len(records)):
                    self._slots.release()
                if len(records) < free:
                    await wait_set(queued, IDLE_RECHECK_SECONDS)

    async def _free_slots(self) -> int:
        """Wait for a free slot, then take every slot free at this moment; how many."""
        await self._slots.acquire()
        taken = 1
        while not self._slots.locked():
            await self._slots.acquire()
            taken += 1
        return taken

    def _start_run(self, record: TaskRecord) -> None:
        """Run a task claimed for this worker, in a slot already taken for it."""
        self._holding.add(record.id)
        run = asyncio.create_task(self._run(record), name=f"scan-{record.id}")
        self._runs[record.id] = run
        run.add_done_callback(partial(self._on_run_done, record.id))

    async def _claim(self, limit: int) -> list[TaskRecord]:
        try:
            return await self._store.claim(self.info, self.info.pool, limit)
        except DatabaseUnavailable:
            logger.warning("cannot claim work: the task database is not reachable; retrying")
            return []

    def _on_run_done(self, task_id: str, run: asyncio.Task[None]) -> None:
        self._runs.pop(task_id, None)
        self._holding.discard(task_id)
        self._slots.release()
        if not run.cancelled() and run.exception() is not None:
            logger.error("the run of task %s crashed", task_id, exc_info=run.exception())

    async def _run(self, record: TaskRecord) -> None:
        logs.task_id.set(record.id)  # this run is a task of its own: the id stays within it
        if self._shutdown.is_set():
            await self._store.release(record, self.info.id)
            return
        try:
            record = replace(record, argv=await self._check.argv_to_run(record),
                             time_limit=await self._check.time_limit(record))
        except TaskRefused as e:
            logger.error("task %s refused, nmap not started: %s", record.id, e)
            await self._record(record, failure(f"refused by the worker: {e}"))
            return
        try:
            if not await self._store.mark_started(record, self.info):
                return  # cancelled between claim and start: nmap never ran
        except DatabaseUnavailable:
            # nmap has not started: when the lease expires the task is simply queued again.
            logger.warning("task %s not started: the task database is not reachable", record.id)
            return
        # The lease stays renewed until the verdict is written: a result finished during a
        # database outage is this worker's to record when the database is back.
        await self._record(record, await self._metrics.timed_scan(record.kind, self._scan(record)))

    async def _scan(self, record: TaskRecord) -> ScanOutcome:
        if not os.access(record.argv[0], os.X_OK):
            return judge(PhaseEnd(None, f"nmap not found at {record.argv[0]}", None, ReportSpool()))
        if record.kind is ScanKind.FULL:
            return await self._two_phase_scan(record)
        live = self._live_scan(record, TaskProgress(), ReportSpool())
        return judge(await self._run_phase(record, record.argv, record.time_limit, live))

    def _live_scan(self, record: TaskRecord, progress: TaskProgress, report: ReportSpool, *,
                   hosts: bool = True) -> LiveScan:
        parser = ReportParser(found=HostSpool(self._buffer_hosts), raw=report)
        return LiveScan(self._store, record, self.info.id, progress, parser, hosts=hosts)

    async def _two_phase_scan(self, record: TaskRecord) -> ScanOutcome:
        """A full scan: port discovery, written as a partial result the moment it ends, then
        version detection on the open ports only, within its own time bound."""
        started = time.monotonic()
        progress = TaskProgress()
        progress.begin(DISCOVERY)
        # One report for both runs: nmap's two XML documents in turn, as evidence keeps them.
        report = ReportSpool()
        discovery = self._live_scan(record, progress, report)
        found = await self._run_phase(record, record.argv, record.time_limit, discovery, write_all=True)
        first = judge(found)
        second_argv = version_argv(record.argv, first.hosts.open_by_host) if first.result is not None else None
        if first.status is not TaskStatus.COMPLETED or second_argv is None:
            return first
        left_s = record.time_limit - (time.monotonic() - started)
        bound_s = max(min(self._version_seconds, left_s), 1.0)
        progress.begin(VERSION_DETECTION, bound_s)
        versions = self._live_scan(record, progress, report, hosts=False)
        await versions.announce()
        return judge(found, await self._run_phase(record, second_argv, bound_s, versions))

    async def _run_phase(
        self, record: TaskRecord, argv: list[str], time_limit_s: float, live: LiveScan, *, write_all: bool = False
    ) -> PhaseEnd:
        """Run one nmap until it ends, the task is no longer ours, or the worker shuts down;
        what happened, as facts for `judge`."""
        started = time.monotonic()
        scan = asyncio.create_task(self._metrics.nmap_process(run_nmap(
            argv, sandbox=self._sandbox, time_limit_s=float(time_limit_s), xml_sink=live.feed_xml,
            output_sink=live.feed_output)))
        lost = asyncio.create_task(self._until_lost(record))
        shutdown = asyncio.create_task(self._shutdown.wait())
        try:
            await asyncio.wait({scan, lost, shutdown}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (lost, shutdown):
                waiter.cancel()
            if not scan.done():
                scan.cancel()
            await asyncio.gather(scan, return_exceptions=True)
            await live.close(write_all=write_all)
        found = live.report.findings(record.target, addresses=scanned_addresses(argv),
                                     elapsed_s=time.monotonic() - started)
        raw = live.report.raw
        if scan.cancelled():
            cancelled = lost.done() and not lost.cancelled()
            return PhaseEnd(TaskStatus.CANCELLED if cancelled else TaskStatus.INTERRUPTED, None, found, raw)
        if scan.exception() is not None:
            logger.error("task %s: nmap could not be run", record.id, exc_info=scan.exception())
            return PhaseEnd(None, "internal error while running the scan", found, raw)
        run = scan.result()
        problem = run_problem(run, live.report, found.head, time_limit_s)
        if problem is not None:
            logger.warning("task %s: an nmap run failed: %s; nmap stderr: %s", record.id, problem,
                           clean_text(run.stderr.decode("utf-8", "replace"), 2000))
        return PhaseEnd(None, problem, found, raw)

    async def _until_lost(self, record: TaskRecord) -> None:
        """Return once the task is no longer this worker's (cancelled, or resolved elsewhere)."""
        with self._store.feed.subscribe(record.id) as changed:
            while True:
                await changed.wait()
                changed.clear()
                with contextlib.suppress(DatabaseUnavailable):
                    if not await self._store.still_ours(record.id, self.info.id):
                        return

    async def _record(self, record: TaskRecord, outcome: ScanOutcome) -> None:
        """Write the verdict, retrying with backoff while the database is unreachable (during
        shutdown for at most the grace period): a finished result is never dropped silently."""
        delay_s, deadline = RETRY_FIRST_SECONDS, None
        while True:
            try:
                if not await self._store.finish(record, self.info.id, outcome):
                    logger.info("task %s was cancelled or resolved elsewhere; kept that state", record.id)
                return
            except DatabaseUnavailable:
                if self._shutdown.is_set():
                    deadline = deadline or time.monotonic() + self._grace_s
                    if time.monotonic() > deadline:
                        logger.error("task %s: gave up recording its %s result at shutdown", record.id,
                                     outcome.status.value)
                        return
                logger.warning("task %s finished %s but the task database is not reachable; retrying in %.1f s",
                               record.id, outcome.status.value, delay_s)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, RETRY_MAX_SECONDS)
            except Exception:
                if outcome.status is TaskStatus.FAILED and outcome.result is None:
                    raise
                # A result the store cannot take (a bug): the task still gets a verdict, not a lease to expire.
                logger.exception("task %s: its %s result could not be recorded", record.id, outcome.status.value)
                outcome = failure("internal error while recording the result")

    async def _heartbeat_loop(self) -> None:
        """Renew this worker's leases every third of a lease. A renewal that failed wrote no
        lease, and one the database was slow to answer may have committed a lease already
        old: either is followed by another within RENEW_AGAIN_SECONDS."""
        pause_s = self._store.lease_seconds / 3
        while True:
            await asyncio.sleep(pause_s)
            started = time.monotonic()
            try:
                lost = await self._store.renew(self.info, sorted(self._holding))
            except DatabaseUnavailable:
                logger.warning("heartbeat failed: the task database is not reachable; retrying")
                pause_s = min(RENEW_AGAIN_SECONDS, self._store.lease_seconds / 3)
                continue
            # Their watchers re-read the task and stop its nmap.
            self._store.feed.publish(*lost)
            slow = time.monotonic() - started > SLOW_CALL_SECONDS
            pause_s = min(RENEW_AGAIN_SECONDS, self._store.lease_seconds / 3) if slow else self._store.lease_seconds / 3


async def nmap_identity(nmap_path: str, sandbox: Sequence[str]) -> tuple[str | None, str | None]:
    """The version and platform `nmap --version` gives, run as scans run (None for what it
    did not tell): what every task a worker starts records as the nmap that ran it."""
    try:
        build = await nmap_build(nmap_path, sandbox)
    except (OSError, TimeoutError) as e:
        logger.warning("cannot learn nmap's version from %s (%s); tasks record it as unknown", nmap_path, e)
        return None, None
    return build["nmap_version"] or None, build["platform"] or None


# ---- how a scan ends: the one place its verdict is made -----------------------------------

# What a caller is told of a scan the worker stopped, by the status it was stopped with.
STOPPED_ERRORS = {TaskStatus.CANCELLED: "cancelled", TaskStatus.INTERRUPTED: SHUTDOWN_ERROR}


@dataclass(frozen=True)
class PhaseEnd:
    """The facts of one nmap run of a task: what stopped it (the worker, for a cancel or a
    shutdown), what went wrong with it (scanner.run_problem, or why nmap could not run), what
    its report holds (None when nmap never ran) and the XML (a full scan's runs share theirs)."""

    stopped_by: TaskStatus | None
    problem: str | None
    found: Findings | None
    report: ReportSpool


def judge(first: PhaseEnd, versions: PhaseEnd | None = None) -> ScanOutcome:
    """How a scan ended, as the store records it, from the facts of its runs: `first` (its
    only run, or a full scan's port discovery, which completed when `versions` is given) and
    a full scan's `versions` (version detection). A run that did not complete keeps what it
    found, partial; version detection that did not complete leaves the discovered ports as
    they were, with a warning (partial too when the scan was stopped)."""
    outcome = _outcome_of(first)
    if versions is None:
        return outcome
    assert first.found is not None and versions.found is not None
    detected = versions.found.head.model_copy(update={"hosts": versions.found.hosts.hosts()})
    if versions.stopped_by is not None:
        merged = with_versions(first.found, detected, "stopped during version detection")
        return ScanOutcome(versions.stopped_by, as_partial(merged.head), STOPPED_ERRORS[versions.stopped_by],
                           merged.hosts, versions.report)
    warning = None if versions.problem is None else (
        f"version detection did not finish ({versions.problem}); ports without a version come from port discovery")
    merged = with_versions(first.found, detected, warning)
    return ScanOutcome(TaskStatus.COMPLETED, merged.head, None, merged.hosts, versions.report)


def _outcome_of(end: PhaseEnd) -> ScanOutcome:
    kept = end.found if end.found is not None and end.found.hosts.count else None
    hosts = kept.hosts if kept is not None else HostSpool()
    found = as_partial(kept.head) if kept is not None else None
    if end.stopped_by is not None:
        return ScanOutcome(end.stopped_by, found, STOPPED_ERRORS[end.stopped_by], hosts, end.report)
    if end.problem is not None:
        return ScanOutcome(TaskStatus.FAILED, found, end.problem, hosts, end.report)
    assert end.found is not None
    return ScanOutcome(TaskStatus.COMPLETED, end.found.head, None, end.found.hosts, end.report)


def as_partial(result: ScanResult) -> ScanResult:
    """The result of a scan that did not complete: partial, even when nmap's report of the
    run it stopped in was whole (a stopped full scan's discovery; a failed run's report)."""
    return result.model_copy(update={"partial": True})


def failure(error: str) -> ScanOutcome:
    """The verdict of a scan that failed with nothing kept: one refused before nmap ran, or
    one whose outcome the store could not take (a bug)."""
    return ScanOutcome(TaskStatus.FAILED, None, error)


class LiveScan:
    """A running scan's report as it streams, and the part of it already written: progress,
    and (unless `hosts` is false, for a phase that re-scans hosts already written) the hosts
    nmap has finished and the open ports it announced on the hosts it has not.

    Finished hosts are written about once a second, and sooner when as many as the report's
    buffer (scan_buffer_hosts) wait: a fast scan finishes thousands of hosts a second, and
    holding them parsed for the next write was what a big scan's memory grew with."""

    def __init__(self, store: WorkerStore, record: TaskRecord, worker_id: str, progress: TaskProgress,
                 report: ReportParser, *, hosts: bool = True) -> None:
        self.report = report
        # The task's one scale, shared by the runs of a full scan: it never goes down.
        self._progress = progress
        self._store = store
        self._record = record
        self._worker_id = worker_id
        self._write_hosts = hosts
        self._hosts_written = 0
        self._unconfirmed_written: list[HostDetail] = []
        self._progress_written: Progress | None = None
        # Hosts written at most per write; reaching it makes the next write due at once.
        self._batch = report.found.buffer_hosts
        self._closed = asyncio.Event()
        self._due = asyncio.Event()
        self._writer = asyncio.create_task(self._write_every(LIVE_WRITE_SECONDS), name=f"live-{record.id}")

    def feed_xml(self, chunk: bytes) -> None:
        """nmap's XML: its finished hosts wait for a write, where hosts are written."""
        self.report.feed(chunk)
        if not self._write_hosts:
            self.report.take_recent(len(self.report.recent))
        elif len(self.report.recent) >= self._batch:
            self._due.set()

    def feed_output(self, chunk: bytes) -> None:
        """nmap's normal output: its announcements matter only where hosts are written."""
        if self._write_hosts:
            self.report.feed_output(chunk)

    async def announce(self) -> None:
        """Say at once which phase began (nmap reports its progress only every few seconds)."""
        await self._write()

    async def close(self, *, write_all: bool = False) -> None:
        """Stop writing; a write under way is finished first, so none lands after the verdict.
        With `write_all`, what is not written yet is written now (the end of a first phase)."""
        self._closed.set()
        self._due.set()
        await asyncio.gather(self._writer, return_exceptions=True)
        if write_all:
            await self._write(len(self.report.recent))

    async def _write_every(self, interval_s: float) -> None:
        while not self._closed.is_set():
            await wait_set(self._due, interval_s)
            self._due.clear()
            if not self._closed.is_set():
                await self._write(self._batch)

    async def _write(self, most: int = 0) -> None:
        """Write progress, and up to `most` of the hosts finished since the last write."""
        hosts = self.report.recent[:most]
        unconfirmed = self.report.unconfirmed() if self._write_hosts else []
        changed = unconfirmed != self._unconfirmed_written
        progress = self._progress.shown(self.report.progress)
        if not hosts and not changed and progress == self._progress_written:
            return
        try:
            await self._store.save_live(self._record, self._worker_id, progress, self._hosts_written, hosts,
                                        unconfirmed if changed else None)
        except DatabaseUnavailable:
            logger.warning("task %s: progress not written, the task database is not reachable", self._record.id)
            # Beyond a buffer's worth, hosts waiting are let go unwritten: the verdict has them all
            # (report.found), and only a read of the running scan misses them meanwhile.
            self._skip(len(self.report.recent) - self._batch)
            return
        self._skip(len(hosts))
        if len(self.report.recent) >= self._batch:
            self._due.set()
        self._unconfirmed_written = unconfirmed
        self._progress_written = progress

    def _skip(self, count: int) -> None:
        """The first `count` hosts waiting are written (or let go): the next ones follow them."""
        if count > 0:
            self._hosts_written += count
            self.report.take_recent(count)


async def resolve_expired_forever(store: WorkerStore, db: Database, interval_s: float) -> None:
    """Any process: resolve tasks whose worker's lease expired, every `interval_s`.

    A lease is judged only once the database has answered this process promptly for a whole
    lease period (Database.calm_seconds, from the process's start): while it was unreachable
    or slow (a freeze, a failover), the workers' renewals failed or committed late too, and a
    worker holding a finished result must get the chance to record it. Meanwhile the reaper
    only pings, to see the database answer again. A task is resolved once its lease was seen
    expired, unchanged, by two passes (WorkerStore.resolve_expired)."""
    suspects: dict[str, float] = {}
    while True:
        try:
            if db.calm_seconds() >= store.lease_seconds:
                suspects = await store.resolve_expired(suspects)
            else:
                suspects = {}
                await db.ping()
        except DatabaseUnavailable:
            suspects = {}
        await asyncio.sleep(interval_s)


async def fold_stale_forever(store: WorkerStore, interval_s: float) -> None:
    """Any process, from its start: fold the completed scans whose fold a process left pending
    (it stopped, or lost the database, mid-fold), every `interval_s`."""
    while True:
        with contextlib.suppress(DatabaseUnavailable):
            await store.fold_stale()
        await asyncio.sleep(interval_s)
