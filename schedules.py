"""Schedules: a scan run again and again for its owner, each run diffed against the one before.

`Schedules` is the use case behind schedule_scan, list_schedules and delete_schedule. A new
schedule is checked exactly as its scan tool would check the same call (the token's right to
that tool, the command's allowlist, the targets against the policy, the pool), so a refusal
comes at creation, not at the first run; then `every`, at most as often as
`min_schedule_seconds`, and the webhook URL against `webhook_allowed_urls` and
`webhook_allowed_addresses` (webhooks.py).

`Scheduler` runs in every process; whichever holds the database lease `scheduler` does the
work, each tick (at most TICK_SECONDS apart, sooner when a schedule falls due):

1. Fire each due schedule that has no run still going: one transaction, fenced by the lease,
   moves its next run time on and inserts the run (unique per due time). The next time is the
   first one after now, so due times missed while no process ran are run once, not replayed.
2. Queue the fired run's scan through ScanService with rescan (it really scans). The task is
   linked to the run in the transaction that queues it, so a run whose process died between
   1 and 2 is queued by the next holder, and never twice.
3. Settle runs whose task finished: a completed one is diffed against the previous completed
   run of the schedule; a change is kept on the run (list_schedules shows the latest) and, with
   a webhook, becomes due to be sent.
4. Send due webhooks (webhooks.py), each attempt claimed in the database first so that two
   processes never send the same attempt; WEBHOOK_ATTEMPTS attempts with doubling pauses, then
   the failure is recorded. A webhook refused where it would go (its URL, or an address its
   host resolves to) is recorded failed at once, with the reason, and not retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from cronsim import CronSim, CronSimError
from fastmcp.exceptions import ToolError

import webhooks
from audit import Auditor
from change_feed import wait_set
from config import Settings
from db import DatabaseUnavailable
from engagement_store import EngagementNotFound
from engagements import EngagementRefused, opening
from limits import QueueFull, RateLimited
from models import (
    ScanDiff,
    ScanKind,
    ScheduleChange,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleInfo,
    ScheduleList,
    ScheduleRun,
    TaskStatus,
    stored_diff,
)
from nmap_options import CommandError
from policy import NoPool
from result_store import hosts_in
from scans import ScanRequest, ScanService, ShuttingDown, without_waiting
from schedule_store import SCHEDULES_KEY, RunAlreadyQueued, RunRecord, ScheduleRecord, ScheduleState, ScheduleStore
from stores import Stores
from supervisor import Supervisor
from targets import TargetError
from views import capped_diff, diff_results, schedule_page

logger = logging.getLogger(__name__)

SCHEDULER_LEASE = "scheduler"
TICK_SECONDS = 1.0
# Ticks follow each other at least this far apart, even when a schedule is overdue.
MIN_PAUSE_SECONDS = 0.05
WEBHOOK_ATTEMPTS = 4
# The pause after the first failed attempt; it doubles after each further one (2, 4, 8 s).
WEBHOOK_BACKOFF_SECONDS = 2.0
INTERVAL = re.compile(r"^([1-9][0-9]{0,5})([smhd])$")
UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
# A cron expression's shortest gap is looked for among this many firings: more than one day's
# worth of an expression that fires every minute, so every pattern of a day is seen.
CRON_FIRINGS_CHECKED = 1441
SCAN_TOOLS = {ScanKind.QUICK: "quick_scan", ScanKind.FULL: "full_scan", ScanKind.CUSTOM: "custom_scan"}


class ScheduleError(ValueError):
    """The schedule's arguments do not fit: its scan, or `every` (unreadable or too frequent)."""


class ScheduleForbidden(PermissionError):
    """The token may not use the scan tool whose scan the schedule would run."""


# Why a run's scan may be refused although its schedule was accepted (the policy changed since).
REFUSED = (TargetError, CommandError, NoPool, QueueFull, RateLimited, ScheduleForbidden, EngagementRefused,
           EngagementNotFound)


@dataclass(frozen=True)
class Every:
    """How often a schedule runs: an interval in seconds, or (seconds None) a cron expression in UTC."""

    text: str
    seconds: int | None

    def next_after(self, anchor: float, now: float) -> float:
        """The first run time after `now`; intervals count from `anchor`, the schedule's creation."""
        if self.seconds is not None:
            return anchor + self.seconds * (math.floor((now - anchor) / self.seconds) + 1)
        return next(CronSim(self.text, datetime.fromtimestamp(now, UTC))).timestamp()

    def shortest_gap(self, now: float) -> float:
        """The fewest seconds between two runs."""
        if self.seconds is not None:
            return self.seconds
        firings = itertools.islice(CronSim(self.text, datetime.fromtimestamp(now, UTC)), CRON_FIRINGS_CHECKED)
        return min((b - a).total_seconds() for a, b in itertools.pairwise(firings))


def parse_every(text: str) -> Every:
    """`90s`, `15m`, `1h`, `1d`, or a 5-field cron expression (`*/10 * * * *`, in UTC)."""
    text = " ".join(text.split())
    if match := INTERVAL.match(text):
        return Every(text, int(match[1]) * UNIT_SECONDS[match[2]])
    if len(text.split()) != 5:
        raise ScheduleError("'every' must be an interval (90s, 15m, 1h, 1d) or a cron expression of 5 fields "
                            "(minute hour day-of-month month day-of-week)")
    try:
        CronSim(text, datetime.now(UTC))
    except CronSimError as e:
        raise ScheduleError(f"'every' is not a valid cron expression: {str(e).lower()}") from e
    return Every(text, None)


class Schedules:
    """The callers' schedules (`owner` is the caller's token name)."""

    def __init__(self, store: ScheduleStore, service: ScanService, settings: Settings) -> None:
        self._store = store
        self._service = service
        self._settings = settings

    def request(self, kind: ScanKind, spec: str, engagement: str | None = None) -> ScanRequest:
        """The scan a run of a schedule asks for: a quick or full scan of `spec`, or the custom
        command `spec`, under `engagement`."""
        if kind is ScanKind.CUSTOM:
            return self._service.custom(spec, engagement=engagement)
        build = self._service.quick if kind is ScanKind.QUICK else self._service.full
        return build(spec, engagement=engagement)

    async def create(self, owner: str, kind: ScanKind, target: str | None, command: str | None, every: str,
                     webhook_url: str | None, engagement: str | None = None) -> ScheduleCreated:
        """Check the schedule as its scan tool would check the same call (at any hour: its runs
        wait for the engagement's windows), then store it."""
        spec = self._spec(kind, target, command)
        if not self._service.policy.may(owner, SCAN_TOOLS[kind]):
            raise ScheduleForbidden(f"this token may not use {SCAN_TOOLS[kind]}, so it may not schedule it")
        checked = await self._service.check(owner, self.request(kind, spec, engagement), any_hour=True)
        cadence, now = parse_every(every), time.time()
        if (gap := cadence.shortest_gap(now)) < self._settings.min_schedule_seconds:
            raise ScheduleError(f"'every' {cadence.text!r} runs {gap:g} s apart; this server runs a schedule at most "
                                f"every {self._settings.min_schedule_seconds} s")
        if webhook_url is not None:
            webhooks.check_url(webhook_url, self._settings.webhook_rules())
        secret = secrets.token_urlsafe(32) if webhook_url is not None else None
        first = now if cadence.seconds is not None else cadence.next_after(now, now)
        schedule_id = str(uuid.uuid4())
        await self._store.create({
            "id": schedule_id, "owner": owner, "kind": kind.value, "spec": spec, "every": cadence.text,
            "created_at": now, "next_run_at": first, "webhook_url": webhook_url, "webhook_secret": secret,
            "engagement": checked.engagement,
        }, self._service.policy.limits(owner).schedules)
        note = " Keep webhook_secret: it verifies the webhook's signature and is not shown again." if secret else ""
        return ScheduleCreated(schedule_id=schedule_id, next_run_at=first, webhook_secret=secret,
                               message=f"Scheduled every {cadence.text}; list_schedules shows its runs.{note}")

    async def list_schedules(self, owner: str, limit: int = 100, offset: int = 0) -> ScheduleList:
        """A page of the caller's schedules from the `offset`th: as many of `limit` as fit the
        answer's size cap, their changes sharing it."""
        states, total = await self._store.states(owner, limit, offset)
        shown = [describe(state, self._share(states)) for state in states]
        return schedule_page(shown, total, offset, self._settings.max_answer_bytes)

    async def list_all_schedules(self, limit: int) -> list[tuple[str, ScheduleInfo]]:
        """Every token's schedules, each with its owner (for operators)."""
        states, _ = await self._store.states(None, limit)
        return [(state.schedule.owner, describe(state, self._share(states))) for state in states]

    def _share(self, states: list[ScheduleState]) -> int:
        """The bytes each schedule's last change may take of one answer: so little that one
        schedule with its change always fits (a page moves on), and often all of them."""
        return self._settings.max_answer_bytes // (len(states) + 2)

    async def delete(self, owner: str, schedule_id: str) -> ScheduleDeleted:
        """Delete the caller's schedule: it runs no more (a scan under way finishes as a normal task)."""
        await self._store.delete(schedule_id, owner)
        return ScheduleDeleted(schedule_id=schedule_id)

    @staticmethod
    def _spec(kind: ScanKind, target: str | None, command: str | None) -> str:
        if kind is ScanKind.CUSTOM:
            if command is None or target is not None:
                raise ScheduleError("a custom schedule takes `command` (as custom_scan does) and no `target`")
            return command
        if target is None or command is not None:
            raise ScheduleError(f"a {kind.value} schedule takes `target` (as {SCAN_TOOLS[kind]} does) and no `command`")
        return target


def describe(state: ScheduleState, cap: int) -> ScheduleInfo:
    """A schedule as list_schedules shows it, its last change cut to fit `cap` bytes."""
    schedule, run, change = state.schedule, state.last_run, state.last_change
    custom = schedule.kind is ScanKind.CUSTOM
    return ScheduleInfo(
        schedule_id=schedule.id, kind=schedule.kind, target=None if custom else schedule.spec,
        command=schedule.spec if custom else None, every=schedule.every, created_at=schedule.created_at,
        next_run_at=schedule.next_run_at,
        webhook=webhooks.shown(schedule.webhook_url) if schedule.webhook_url else None,
        engagement=schedule.engagement,
        last_run=None if run is None else ScheduleRun(due_at=run.due_at, task_id=run.task_id, error=run.error,
                                                      status=state.last_task_status or run.status),
        last_change=None if change is None or change.diff is None else ScheduleChange(
            found_at=change.finished_at or change.due_at,
            diff=capped_diff(stored_diff(change.diff), cap),
            webhook=change.webhook_status, webhook_error=change.webhook_error),
    )


def changed(diff: ScanDiff) -> bool:
    return bool(diff.hosts_came_up or diff.hosts_went_down or diff.ports_opened or diff.ports_closed
                or diff.services_changed)


def webhook_payload(schedule: ScheduleRecord, run: RunRecord) -> bytes:
    """The body of a change's webhook: the same bytes on every attempt."""
    custom = schedule.kind is ScanKind.CUSTOM
    return webhooks.body({
        "event": "scan_changed", "schedule_id": schedule.id, "run_id": run.id, "kind": schedule.kind.value,
        "target": None if custom else schedule.spec, "command": schedule.spec if custom else None,
        "task_id": run.task_id, "previous_task_id": run.previous_task_id, "time": run.finished_at,
        "diff": stored_diff(run.diff or "{}").model_dump(mode="json"),
    })


class Scheduler:
    """One process's scheduler; see the module docstring for what it does while it holds the lease."""

    def __init__(self, stores: Stores, schedules: Schedules, service: ScanService, settings: Settings,
                 auditor: Auditor, *, name: str) -> None:
        self.holder = str(uuid.uuid4())
        self._name = f"{name} pid {os.getpid()}"
        self._store = stores.schedules
        self._stores = stores
        self._tasks = stores.tasks
        self._feed = stores.feed
        self._schedules = schedules
        self._service = service
        self._settings = settings
        # Each run's scan is audited like a tool call, as the tool `schedule_run`.
        self._auditor = auditor
        # The pause after a webhook's first failed attempt (it doubles after each further one).
        self.backoff_seconds = WEBHOOK_BACKOFF_SECONDS
        # What sends each attempt; tests give it a resolver and TLS trust of their own.
        self.sender = webhooks.Sender(settings.webhook_rules())
        self._holding = False
        self._renewed = -math.inf
        self._sending: dict[str, asyncio.Task[None]] = {}
        self._loop: asyncio.Task[None] | None = None

    async def start(self, supervisor: Supervisor) -> None:
        self._loop = supervisor.start("scheduler", self._run_forever())

    async def stop(self) -> None:
        """Stop firing and sending (a webhook attempt cut short is retried by the next holder); give the lease back."""
        for task in [self._loop, *self._sending.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*filter(None, [self._loop, *self._sending.values()]), return_exceptions=True)
        if self._holding:
            with contextlib.suppress(DatabaseUnavailable):
                await self._store.release_lease(SCHEDULER_LEASE, self.holder)
            self._holding = False

    async def _run_forever(self) -> None:
        with self._feed.subscribe(SCHEDULES_KEY) as created:
            while True:
                created.clear()
                pause_s = self._settings.lease_seconds / 3
                try:
                    if await self._hold():
                        pause_s = await self.tick()
                except DatabaseUnavailable:
                    logger.warning("the scheduler cannot reach the task database; retrying in %.1f s", pause_s)
                except Exception:
                    # The loop outlives any one failure: a bug is logged with its traceback, and retried.
                    logger.exception("the scheduler's tick failed; retrying in %.1f s", pause_s)
                await wait_set(created, pause_s)

    async def _hold(self) -> bool:
        """Whether this process holds the scheduler lease, renewed every third of its length."""
        now = time.monotonic()
        if self._holding and now - self._renewed < self._settings.lease_seconds / 3:
            return True
        held = await self._store.hold_lease(SCHEDULER_LEASE, self.holder, self._name, self._settings.lease_seconds)
        if held != self._holding:
            logger.info("%s %s the scheduler lease", self._name, "now holds" if held else "no longer holds")
        self._holding, self._renewed = held, now
        return held

    async def tick(self) -> float:
        """Do what is due now (the module docstring's four steps); return the pause until the next tick."""
        work = await self._store.work(time.time())
        for run in work.unsubmitted:
            if run.schedule_id in work.schedules:
                await self._submit(run.id, work.schedules[run.schedule_id])
        for schedule in work.due:
            await self._fire(schedule)
        for run in work.finished:
            if run.schedule_id in work.schedules:
                await self._settle(run, work.schedules[run.schedule_id])
        for run in work.webhooks:
            if run.schedule_id in work.schedules and run.id not in self._sending:
                self._send(run, work.schedules[run.schedule_id])
        # Idle (no run going), it sleeps until the next due time or webhook attempt, or until the
        # lease wants renewing; a new schedule wakes it at once (SCHEDULES_KEY). A run going is
        # looked at every TICK_SECONDS, for its scan's end.
        longest = TICK_SECONDS if work.runs_going or work.unsubmitted else self._settings.lease_seconds / 3
        wake_at = min((t for t in (work.next_due, work.next_webhook_at) if t is not None), default=None)
        until_due_s = wake_at - time.time() if wake_at is not None else longest
        return min(longest, max(until_due_s, MIN_PAUSE_SECONDS))

    async def _fire(self, schedule: ScheduleRecord) -> None:
        now = time.time()
        following = parse_every(schedule.every).next_after(schedule.created_at, now)
        if schedule.engagement is not None:
            closed = await self._closed_until(schedule, now)
            if closed is not None:
                await self._store.postpone(schedule, following if math.isinf(closed) else closed,
                                           SCHEDULER_LEASE, self.holder)
                return
        run_id = await self._store.claim_run(schedule, following, SCHEDULER_LEASE, self.holder)
        if run_id is not None:
            await self._submit(run_id, schedule)

    async def _closed_until(self, schedule: ScheduleRecord, now: float) -> float | None:
        """None while the schedule's engagement allows scans; else when it next does (the due
        run waits for it: a window's opening runs it once), inf when it never will again (the
        schedule then only keeps its cadence, and its runs' refusals are not recorded)."""
        assert schedule.engagement is not None
        try:
            rules = (await self._stores.engagements.get(schedule.engagement)).rules
        except EngagementNotFound:
            return None  # the run is refused, and says why
        state = opening(rules, now)
        if state.open:
            return None
        return math.inf if state.opens_at is None else state.opens_at

    async def _submit(self, run_id: str, schedule: ScheduleRecord) -> None:
        """Queue the run's scan as a normal task of the schedule's owner, linked to the run."""
        facts = {"schedule_id": schedule.id, "run_id": run_id}
        try:
            with self._auditor.call(schedule.owner, "schedule_run", facts, scans=True), without_waiting():
                await self._may_still_scan(schedule)
                request = self._schedules.request(schedule.kind, schedule.spec, schedule.engagement)
                await self._service.scan(schedule.owner, request, timeout_s=0, rescan=True, schedule_run=run_id)
        except (RunAlreadyQueued, ShuttingDown):
            return  # queued by another process already, or left for the next holder
        except (*REFUSED, ToolError) as e:
            logger.warning("schedule %s: a run's scan was refused: %s", schedule.id, e)
            await self._store.settle_run(run_id, "failed", error=str(e))

    async def _may_still_scan(self, schedule: ScheduleRecord) -> None:
        """ScheduleForbidden unless the owner may still use the schedule's tool: its token's
        grant, or a person's role as the shared people table has it now (gone: no grant)."""
        policy = self._service.policy
        await policy.people.refresh(schedule.owner)
        if not policy.may(schedule.owner, SCAN_TOOLS[schedule.kind]):
            raise ScheduleForbidden(f"the schedule's owner may no longer use {SCAN_TOOLS[schedule.kind]}")

    async def _settle(self, run: RunRecord, schedule: ScheduleRecord) -> None:
        """Diff a finished run against the previous completed one; keep a change, due to be sent."""
        assert run.task_id is not None
        record, now_found = await self._tasks.stored_result(run.task_id, schedule.owner)
        if record.status is not TaskStatus.COMPLETED or now_found is None:
            await self._store.settle_run(run.id, "failed", error=record.error or f"the scan {record.status.value}")
            return
        previous = await self._store.previous_completed_run(run)
        before, before_found = await self._tasks.stored_result(previous.task_id, schedule.owner) \
            if previous is not None and previous.task_id else (None, None)
        diff = None
        if before is not None and before_found is not None:
            # In a thread, as diff_scans does: the hosts are parsed a chunk at a time as they are compared.
            found = await asyncio.to_thread(diff_results, before.id, hosts_in(before_found), record.id,
                                            hosts_in(now_found))
            diff = capped_diff(found, self._settings.max_answer_bytes) if changed(found) else None
        await self._store.settle_run(run.id, "done", previous_task_id=before.id if before else None,
                                     diff=diff.model_dump_json() if diff else None,
                                     webhook=diff is not None and schedule.webhook_url is not None)

    def _send(self, run: RunRecord, schedule: ScheduleRecord) -> None:
        sending = asyncio.create_task(self._deliver(run, schedule), name=f"webhook-{run.id}")
        self._sending[run.id] = sending

        def done(task: asyncio.Task[None]) -> None:
            self._sending.pop(run.id, None)
            if not task.cancelled() and task.exception() is not None:
                logger.error("the webhook of run %s crashed", run.id, exc_info=task.exception())

        sending.add_done_callback(done)

    async def _deliver(self, run: RunRecord, schedule: ScheduleRecord) -> None:
        """One attempt at sending a run's change; the last failed attempt records the failure."""
        attempt = run.webhook_attempts + 1
        pause_s = self.backoff_seconds * 2 ** (attempt - 1)
        if not await self._store.claim_webhook_attempt(run, time.time() + self.sender.deadline_s + pause_s):
            return
        assert schedule.webhook_url is not None and schedule.webhook_secret is not None
        try:
            problem = await self.sender.post(schedule.webhook_url, webhook_payload(schedule, run),
                                             schedule.webhook_secret, run.id)
        except webhooks.WebhookRefused as e:
            logger.warning("schedule %s: its webhook was not sent: %s", schedule.id, e)
            await self._store.record_webhook(run.id, "failed", f"not sent: {e}", None)
            return
        if problem is None:
            await self._store.record_webhook(run.id, "sent", None, None)
        elif attempt >= WEBHOOK_ATTEMPTS:
            logger.warning("schedule %s: gave up its webhook after %d attempts: %s", schedule.id, attempt, problem)
            await self._store.record_webhook(run.id, "failed", f"{problem} (after {attempt} attempts)", None)
        else:
            await self._store.record_webhook(run.id, "pending", problem, time.time() + pause_s)
