"""The scan use case, without MCP: validate, resolve, build argv, submit or reuse, wait, present.

Every front door (the MCP tools over HTTP or stdio, schedules, a dashboard) calls
`ScanService`. It raises the exceptions of the modules it uses (TargetError, CommandError,
QueueFull, TaskNotFound, DatabaseUnavailable, ...); each front door turns them into its own
errors. Nothing here needs a FastMCP context.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple

import audit
from approval_store import ApprovalRecord
from approvals import reply_of
from config import Settings
from db import DatabaseUnavailable
from disk_space import disk_problem
from engagements import (
    Engagement,
    EngagementRefused,
    ScopedTarget,
    approval_reasons,
    check_kind,
    check_member,
    check_scope,
    check_time,
    iso_utc,
    opening,
    time_left,
    with_exclusions,
)
from impact import estimate, max_rate_of, options_of, ports_per_address, probes, rated
from inventory import HostQuery, parse_network, parse_since
from limits import QueueFull, RateLimited
from models import (
    InventoryPage,
    LimitsAnswer,
    LimitUsage,
    NmapVersion,
    PlannedScan,
    PoolOverview,
    Progress,
    ScanDiff,
    ScanKind,
    ScanPlan,
    TaskAnswer,
    TaskEvidence,
    TaskList,
    TaskRecord,
    TaskState,
    TaskStatus,
    TopValues,
    WorkerList,
    WorkerStatus,
)
from nmap_options import parse_command
from policy import Policy
from resolver import HostResolver
from result_store import hosts_in
from scanner import NmapBuild, build_argv, nmap_build, scan_options
from sharding import Shard, efficient_group, least_group, shard, shard_size, waits_on_network
from stores import Stores
from targets import IPNetwork, ResolvedTargets, resolve_targets, split_targets
from task_manager import ApprovalRequest, TaskAlreadyFinished
from views import (
    answer,
    capped_diff,
    capped_wait_note,
    csv_page,
    diff_results,
    down_hint,
    held,
    inventory_page,
    json_page,
    reuse_note,
    state,
    text_page,
    with_message,
    with_requested_names,
)
from worker import Worker
from worker_store import PoolStatus

ProgressCallback = Callable[[Progress], Awaitable[None]]
DEFAULT_PAGE = 50
# How long cancel_task waits for this process's own worker to have stopped nmap.
CANCEL_WAIT_SECONDS = 5.0
# Set, for one call, by a front door that answers with a task handle instead of waiting (the
# MCP Tasks extension, mcp_tasks.py): scan() then returns as soon as its task is queued.
_submitted: ContextVar[list[TaskRecord] | None] = ContextVar("submitted_scans", default=None)
# Set by plan_scan while a scan tool turns its arguments into a request: scan() then raises
# Captured with it, before any check.
_capturing: ContextVar[bool] = ContextVar("capturing_scans", default=False)
# How many of the fleet's last similar scans plan_scan's estimate reads.
HISTORY_SCANS = 50


def surrounding(resolved: ResolvedTargets) -> list[IPNetwork]:
    """The networks a scan reaches, each widened to its /24 (IPv4) or /64 (IPv6): the unit in
    which an engagement's approval rule `new_networks` asks whether a network was scanned before."""
    widened: dict[IPNetwork, None] = {}
    for network in (n for covered in resolved.networks for n in covered):
        prefix = 24 if network.version == 4 else 64
        widened[network if network.prefixlen <= prefix else network.supernet(new_prefix=prefix)] = None
    return list(widened)


def scoped(resolved: ResolvedTargets) -> list[ScopedTarget]:
    """The resolved targets as an engagement's scope sees them: each with the name it was given as."""
    return [ScopedTarget(target, resolved.hostnames.get(target), tuple(networks))
            for target, networks in zip(resolved.nmap_targets, resolved.networks, strict=True)]


class ShuttingDown(RuntimeError):
    """The server is shutting down and takes no new scans."""


class NotComparable(ValueError):
    """diff_scans was given a task without a result."""


class Captured(Exception):
    """What a scan tool asked `scan` for, under `capturing()`: nothing was checked or queued."""

    def __init__(self, request: ScanRequest, rescan: bool) -> None:
        super().__init__(request.kind.value)
        self.request = request
        self.rescan = rescan


@dataclass(frozen=True)
class ScanRequest:
    """What a front door asks for: validated nmap options and the targets still to check."""

    kind: ScanKind
    options: list[str]
    targets: list[str]
    # Built-in scans may share an identical running task or a recent result.
    shareable: bool
    # A scanner pool the caller asked for; None: routed by the targets' addresses.
    pool: str | None = None
    # The engagement the caller named; None: its token's or role's default, if any.
    engagement: str | None = None


class CheckedScan(NamedTuple):
    """A request that passed every check: its targets resolved, its argv, its pool, and the
    engagement it runs under with when that engagement's window closes."""

    resolved: ResolvedTargets
    argv: list[str]
    pool: str
    engagement: str | None = None
    closes_at: float | None = None
    # The approval it must wait for (its engagement's approval rules matched); None: none.
    approval: ApprovalRequest | None = None
    # Its engagement's probes per day (all its members' scans together); None: no budget.
    engagement_probes: int | None = None


@contextlib.contextmanager
def without_waiting() -> Iterator[list[TaskRecord]]:
    """Within the block, `ScanService.scan` returns once its task is queued (or an identical
    one reused) instead of waiting for it; the list yielded collects those tasks."""
    submitted: list[TaskRecord] = []
    reset = _submitted.set(submitted)
    try:
        yield submitted
    finally:
        _submitted.reset(reset)


@contextlib.contextmanager
def capturing() -> Iterator[None]:
    """Within the block, `ScanService.scan` raises Captured with the request it was given,
    before any check: a scan tool run here validates its arguments and builds its request
    exactly as when it is called, and scans nothing (plan_scan)."""
    reset = _capturing.set(True)
    try:
        yield
    finally:
        _capturing.reset(reset)


SCAN_TYPES = {"connect": "-sT", "syn": "-sS", "udp": "-sU", "ping": "-sn"}


@dataclass(frozen=True)
class TypedScan:
    """The typed `scan` tool's parameters, for models that do better with fields than with a
    command line. `command()` writes the custom_scan command they mean, so both tools share
    one allowlist, one policy and one canonical argv."""

    targets: str | tuple[str, ...]
    scan_type: str = "connect"
    ports: str | None = None
    top_ports: int = 100
    service_versions: bool = False
    os_detection: bool = False
    scripts: tuple[str, ...] = ()
    skip_host_discovery: bool = False
    timing: str = "T3"

    def command(self) -> str:
        words = [SCAN_TYPES[self.scan_type]]
        if self.scan_type != "ping":
            words += ["-p", self.ports] if self.ports else ["--top-ports", str(self.top_ports)]
        words += ["-sV"] * self.service_versions + ["-O"] * self.os_detection + ["-Pn"] * self.skip_host_discovery
        if self.scripts:
            words += ["--script", ",".join(self.scripts)]
        return shlex.join([*words, f"-{self.timing}", *self.target_words()])

    def target_words(self) -> list[str]:
        """The targets as nmap's words: one string or each string of a list, split on commas and
        whitespace alike."""
        given = (self.targets,) if isinstance(self.targets, str) else self.targets
        return [word for text in given for word in split_targets(text)]


class ScanService:
    """Scans and tasks for authenticated callers (`owner` is the caller's token name)."""

    def __init__(
        self, stores: Stores, policy: Policy, settings: Settings, nmap_path: str, worker: Worker | None,
        version: str = "", *, sandbox: Sequence[str],
    ) -> None:
        self._stores = stores
        self._tasks = stores.tasks
        self.policy = policy
        self._settings = settings
        self._nmap = nmap_path
        self._sandbox = tuple(sandbox)
        self._worker = worker
        # At shutdown new scans are refused first; then, once the worker has stopped, the
        # calls still waiting are released to answer with the state their task ended in.
        self.accepting = True
        self.closing = asyncio.Event()
        self._version = version
        self._nmap_build: NmapBuild | None = None
        # Every token, and the caller over stdio, gets its share of the lookup threads.
        self.resolver = HostResolver(len(settings.named_tokens()) + 1, settings.resolve_timeout)

    # ---- building requests ---------------------------------------------------------------

    def quick(self, target: str, pool: str | None = None, *, skip_host_discovery: bool = False,
              engagement: str | None = None) -> ScanRequest:
        options = scan_options(ScanKind.QUICK, privileged=self._settings.privileged,
                               skip_host_discovery=skip_host_discovery)
        return ScanRequest(ScanKind.QUICK, options, [target], shareable=True, pool=pool, engagement=engagement)

    def full(self, target: str, pool: str | None = None, *, skip_host_discovery: bool = False,
             engagement: str | None = None) -> ScanRequest:
        options = scan_options(ScanKind.FULL, privileged=self._settings.privileged,
                               skip_host_discovery=skip_host_discovery)
        return ScanRequest(ScanKind.FULL, options, [target], shareable=True, pool=pool, engagement=engagement)

    def custom(self, command: str, pool: str | None = None, *, engagement: str | None = None) -> ScanRequest:
        """custom_scan's command, checked against the allowlist (CommandError if refused)."""
        parsed = parse_command(command, self.policy.scripts, privileged=self._settings.privileged)
        if "--host-timeout" not in parsed.options:
            parsed.add_default("--host-timeout", f"{self._settings.custom_host_timeout}s")
        return ScanRequest(ScanKind.CUSTOM, parsed.options, parsed.targets, shareable=False, pool=pool,
                           engagement=engagement)

    def typed(self, spec: TypedScan, pool: str | None = None, *, engagement: str | None = None) -> ScanRequest:
        """The typed scan tool's request: exactly custom_scan's for the command it means."""
        return self.custom(spec.command(), pool, engagement=engagement)

    async def nmap_version(self) -> NmapVersion:
        """The nmap that runs scans, what it was built with, and what this server lets it do."""
        if self._nmap_build is None:
            self._nmap_build = await nmap_build(self._nmap, self._sandbox)
        return NmapVersion(
            **self._nmap_build, server_version=self._version, raw_packet_scans=self._settings.privileged,
            script_categories=list(self._settings.script_categories),
        )

    # ---- running them --------------------------------------------------------------------

    async def check(self, owner: str, request: ScanRequest, *, any_hour: bool = False) -> CheckedScan:
        """Every check `scan` makes before it queues anything (the engagement's rules, the
        caller's rate cap, targets against the caller's policy and the engagement's scope, the
        argv, the pool), raising what it would raise; nothing is queued. Rules that need no DNS
        come first. With `any_hour` (a schedule's, whose runs wait for the windows) only an
        engagement that ended is refused for its time."""
        engagement = await self._engagement(owner, request)
        closes_at = None
        if engagement is not None:
            check_member(engagement.name, engagement.rules, owner, self.policy.role(owner))
            if not any_hour or opening(engagement.rules, time.time()).code == "engagement_ended":
                closes_at = check_time(engagement.name, engagement.rules, time.time()).closes_at
            check_kind(engagement.name, engagement.rules, request.kind, request.options)
        options = rated(request.options, self.policy.max_rate(owner), built_in=request.shareable)
        resolved = await resolve_targets(request.targets, self.policy.targets(owner),
                                         partial(self.resolver.addresses, owner))
        if engagement is not None:
            cutting = check_scope(engagement.name, engagement.rules, scoped(resolved))
            options = with_exclusions(options, cutting)
        argv = build_argv(self._nmap, options, resolved.nmap_targets, ipv6=resolved.ipv6,
                          privileged=self._settings.privileged)
        pool = self.policy.route(list(zip(resolved.nmap_targets, resolved.networks, strict=True)), request.pool)
        if engagement is None:
            return CheckedScan(resolved, argv, pool)
        approval = await self._approval(owner, engagement, options, resolved)
        return CheckedScan(resolved, argv, pool, engagement.name, closes_at, approval, engagement.rules.probes_per_day)

    async def _approval(self, owner: str, engagement: Engagement, options: list[str],
                        resolved: ResolvedTargets) -> ApprovalRequest | None:
        """The approval a scan must wait for, when its engagement's approval rules match it."""
        rules = engagement.rules.approval
        if rules is None:
            return None
        unseen = await self._stores.inventory.unseen(owner, surrounding(resolved)) if rules.new_networks else []
        reasons = approval_reasons(engagement.rules, options, resolved.address_count, time.time(),
                                   lambda pick: self.policy.scripts.catalog.get(pick, frozenset()),
                                   [str(network) for network in unseen])
        return ApprovalRequest(engagement.name, reasons, rules.expires_after_seconds) if reasons else None

    async def _engagement(self, owner: str, request: ScanRequest) -> Engagement | None:
        """The engagement the scan runs under: the one it names, else its caller's default;
        EngagementRefused when there is none and this server requires one."""
        name = request.engagement or self.policy.default_engagement(owner)
        if name is None:
            if self.policy.require_engagement:
                raise EngagementRefused("engagement_required", "every scan on this server runs under an engagement: "
                                                               "name one (list_engagements shows yours)")
            return None
        return await self._stores.engagements.get(name)

    async def scan(
        self, owner: str, request: ScanRequest, *, timeout_s: float, rescan: bool = False,
        on_progress: ProgressCallback | None = None, schedule_run: str | None = None,
    ) -> TaskAnswer:
        """Check the targets, submit (or reuse) the scan, wait up to `timeout_s` (at most the
        configured max_call_wait_seconds), present it.

        Once the scan is queued the answer always carries its task id, even when the wait
        after it fails or the server shuts down. Under `without_waiting()` it does not wait;
        under `capturing()` it raises Captured at once. A `schedule_run` (a run of a schedule)
        is linked to the task that queues it."""
        if _capturing.get():
            raise Captured(request, rescan)
        if not self.accepting:
            raise ShuttingDown("the server is shutting down; retry in a moment")
        checked = await self.check(owner, request)
        resolved, argv, pool, approval = checked.resolved, checked.argv, checked.pool, checked.approval
        submit = partial(self._tasks.submit, **await self._submission(owner, request, checked, rescan),
                         schedule_run=schedule_run, approval=approval)
        if self._worker is not None and self._worker.info.pool == pool:
            record, reused, _ = await self._worker.hand_over(lambda worker: submit(claim_for=worker))
        else:
            record, reused, _ = await submit()
        audit.queued(task_id=record.id, reused=reused, argv=argv, targets=list(resolved.nmap_targets), pool=pool)
        submitted = _submitted.get()
        if submitted is not None:
            submitted.append(record)
            return answer(record)
        if record.status is TaskStatus.AWAITING_APPROVAL:
            return held(answer(record), approval.reasons if approval is not None else [])
        # Capped so that the answer, with its task id, arrives before the caller's client gives up.
        wait_s = min(timeout_s, self._settings.max_call_wait_seconds)
        try:
            # A reused task was read without its result: the wait reads it whole.
            finished = await self._tasks.wait(record.id, owner, wait_s, on_progress=on_progress, stop=self.closing,
                                              known=None if reused else record)
            notes = [reuse_note(record)] * reused
            if wait_s < timeout_s and not finished.status.finished:
                notes.append(capped_wait_note(wait_s, timeout_s))
            return await self.present(finished, note=" ".join(notes) or None)
        except DatabaseUnavailable:
            return with_message(answer(record), "The task database stopped answering while the call waited; "
                                                "the scan is queued. Ask get_task_status later.")

    def _time_limit(self, closes_at: float | None) -> int:
        """A scan's time limit: the server's, cut to end when its engagement's window closes."""
        if closes_at is None:
            return self._settings.max_scan_seconds
        return time_left(self._settings.max_scan_seconds, closes_at)

    async def _submission(self, owner: str, request: ScanRequest, checked: CheckedScan,
                          rescan: bool) -> dict[str, Any]:
        """The arguments of the task store's submit (and trial) for a checked scan."""
        share = request.shareable and not rescan
        return {
            "owner": owner, "kind": request.kind, "target": " ".join(request.targets), "argv": checked.argv,
            "time_limit": self._time_limit(checked.closes_at), "pool": checked.pool, "share": share,
            "fresh_since": time.time() - self._settings.result_freshness_seconds if share else None,
            "shards": await self._shards(owner, request.kind, checked), "limits": self.policy.limits(owner),
            "address_count": checked.resolved.address_count, "probe_count": probes(checked.argv),
            "forced": request.shareable and rescan, "engagement": checked.engagement,
            "engagement_probes": checked.engagement_probes,
        }

    async def _shards(self, owner: str, kind: ScanKind, checked: CheckedScan) -> list[Shard]:
        """The scan's shards as sharding.shard_size sizes them for its pool now, and for its
        network as the pool's last runs of its kind saw it (sharding.waits_on_network); none
        when it runs whole. A scan no larger than its smallest shard could be is never split,
        and costs no read of the pool (every small scan)."""
        addresses, largest = checked.resolved.address_count, self._settings.shard_addresses
        options = options_of(checked.argv)
        least = min(least_group(options), largest)
        if addresses <= least:
            return []
        runs = await self._tasks.run_history(kind, checked.pool, HISTORY_SCANS)
        slow = waits_on_network(probes(checked.argv), runs)
        group = least if slow else min(efficient_group(options), largest)
        size = shard_size(addresses, group, await self._stores.workers.capacity(checked.pool, owner), largest, slow)
        shards = [] if size is None else shard(checked.argv, checked.resolved.networks, size)
        return shards if len(shards) > 1 else []

    async def plan(self, owner: str, tool: str, request: ScanRequest, *,
                   rescan: bool = False) -> tuple[ScanPlan, Exception | None]:
        """What `scan` would do with `request` now, with nothing queued or counted: every check
        it makes (raising what they raise), and its limits and the queue as the refusal they
        would be now (None when the scan would run), beside the plan: the argv, the pool and its
        workers, the size and an estimate from the fleet's history of this kind in this pool."""
        if not self.accepting:
            raise ShuttingDown("the server is shutting down; retry in a moment")
        checked = await self.check(owner, request)
        submission = await self._submission(owner, request, checked, rescan)
        refusal: Exception | None = None
        reused = None
        try:
            reused = await self._tasks.trial(**submission)
        except (RateLimited, QueueFull) as e:
            refusal = e
        pool = await self._pool(checked.pool)
        alive = [worker for worker in pool.workers if worker.alive]
        similar = f"{request.kind.value} scans in pool '{checked.pool}'"
        history = await self._tasks.history(request.kind, checked.pool, HISTORY_SCANS)
        rate = max_rate_of(checked.argv)
        assert rate is not None  # check() gives every argv one
        return ScanPlan(
            tool=tool, verdict="allowed" if refusal is None else "refused", engagement=checked.engagement,
            window_closes_at=iso_utc(checked.closes_at),
            approval_needed=checked.approval.reasons if checked.approval else None, scan=PlannedScan(
            argv=checked.argv, pool=checked.pool, workers_alive=len(alive),
            capacity=sum(worker.capacity for worker in alive), running=sum(worker.running for worker in alive),
            queued=pool.queued, shards=max(len(submission["shards"]), 1), addresses=checked.resolved.address_count,
            ports_per_address=ports_per_address(options_of(checked.argv)), probes=submission["probe_count"],
            max_rate=rate, reuses_task=reused.id if reused is not None else None,
            estimate=estimate(checked.argv, history, similar),
        )), refusal

    async def present(
        self, record: TaskRecord, fmt: str = "json", view: str = "summary", offset: int = 0,
        limit: int = DEFAULT_PAGE, note: str | None = None, port_offset: int = 0, caller: str | None = None,
    ) -> TaskAnswer:
        """Shape a task for the caller: a page of its result (partial while it runs), `note`
        first in its message; the whole answer fits max_answer_bytes on the wire. `port_offset`
        ports of the page's first host are left out (the rest of a host a page cut). A task
        of someone other than `caller` names its owner."""
        shown = answer(record, caller)
        base = (with_message(shown, note) if note else shown).model_copy(update={"format": fmt})
        cap = self._settings.max_answer_bytes
        if fmt == "xml":
            # An answer holds at most `cap` characters: no more of the report is read.
            report = await self._tasks.report_page(record.id, offset, cap)
            if report is None:
                return base
            return text_page(base, report.text, offset=offset, total=report.total, cap=cap)
        page = await self._tasks.result_page(record, offset, limit)
        if page is None:
            return base
        page = with_requested_names(page, record.argv, record.target)
        hint = down_hint(page.head, record.argv)
        if fmt == "csv":
            base = with_message(base, hint) if hint else base
            return csv_page(base, page, cap=cap, port_offset=port_offset)
        if hint:
            page = replace(page, head=page.head.model_copy(update={"warnings": [*page.head.warnings, hint]}))
        return json_page(base, page, view=view, cap=cap, port_offset=port_offset)

    # ---- tasks ---------------------------------------------------------------------------

    async def status(self, owner: str, task_id: str) -> TaskState:
        return state(await self._tasks.get(task_id, await self._reader(owner, task_id)), owner)

    async def evidence(self, owner: str, task_id: str) -> TaskEvidence:
        """What ran for a task the caller may read, when, and the hashes of what it produced."""
        return await self._stores.evidence.task(task_id, await self._reader(owner, task_id))

    async def result(
        self, owner: str, task_id: str, fmt: str = "json", view: str = "summary", offset: int = 0,
        limit: int = DEFAULT_PAGE, port_offset: int = 0,
    ) -> TaskAnswer:
        record = await self._tasks.get(task_id, await self._reader(owner, task_id))
        return await self.present(record, fmt, view, offset, limit, port_offset=port_offset, caller=owner)

    async def _reader(self, caller: str, task_id: str) -> str:
        """Whose task `task_id` the caller reads: their own, or a teammate's where their role
        shares its tasks (team_tasks). Anyone else's id stays not found, as before."""
        team = self.policy.team(caller)
        if team is None:
            return caller
        owner = await self._tasks.owner_of(task_id)
        if owner is None or owner == caller:
            return caller
        await self.policy.people.refresh(owner)
        return owner if self.policy.people.role_of(owner) == team else caller

    async def diff(self, owner: str, task_a: str, task_b: str) -> ScanDiff:
        first, found_a = await self._tasks.stored_result(task_a, await self._reader(owner, task_a))
        second, found_b = await self._tasks.stored_result(task_b, await self._reader(owner, task_b))
        for record, found in ((first, found_a), (second, found_b)):
            if found is None:
                raise NotComparable(f"task {record.id} has no result to compare (it is {record.status.value})")
        assert found_a is not None and found_b is not None
        # In a thread: parsing two big results' hosts takes seconds, which the event loop must not wait out.
        diff = await asyncio.to_thread(diff_results, task_a, hosts_in(found_a), task_b, hosts_in(found_b))
        return capped_diff(diff, self._settings.max_answer_bytes)

    async def list_tasks(self, owner: str, status: TaskStatus | None, limit: int) -> TaskList:
        """The caller's most recent tasks, and their teammates' where their role shares them."""
        team = self.policy.team(owner)
        owners = owner if team is None else sorted({owner, *await self._stores.people.members(team)})
        return TaskList(tasks=[state(record, owner) for record in await self._tasks.recent(owners, status, limit)])

    async def list_all_tasks(self, status: TaskStatus | None, limit: int) -> list[tuple[str, TaskState]]:
        """Every token's most recent tasks, newest first, each with its owner (for operators)."""
        return [(record.owner, state(record)) for record in await self._tasks.recent(None, status, limit)]

    async def answer_hold(self, owner: str, task_id: str, responses: Mapping[str, object] | None) -> TaskAnswer:
        """The requester's answer to what their held scan asked of them (approvals.input_request):
        their reason goes to the approvers; a decline withdraws (cancels) the scan."""
        keep, reason = reply_of(responses)
        record = await self._tasks.get(task_id, owner)
        if record.status is not TaskStatus.AWAITING_APPROVAL:
            return answer(record)
        if not keep:
            with contextlib.suppress(TaskAlreadyFinished):
                await self.cancel(owner, task_id)
            return with_message(answer(await self._tasks.get(task_id, owner)), "You withdrew the scan.")
        if reason is None:
            return answer(record)
        await self._stores.approvals.justify(task_id, owner, reason)
        return with_message(answer(record), "The approvers have your reason.")

    async def hold_of(self, owner: str, task_id: str) -> ApprovalRecord | None:
        """The approval the caller's task waits (or waited) for; None when it needed none."""
        await self._tasks.get(task_id, owner)
        return await self._stores.approvals.of_task(task_id)

    async def cancel(self, owner: str, task_id: str) -> TaskState:
        """Cancel a queued or running scan; when this process runs it, wait until nmap stopped."""
        await self._tasks.cancel(task_id, owner)
        if self._worker is not None:
            await self._worker.wait_stopped(task_id, CANCEL_WAIT_SECONDS)
        return state(await self._tasks.get(task_id, owner))

    async def find_hosts(self, owner: str, filters: Mapping[str, str | int | None], *, limit: int = DEFAULT_PAGE,
                         offset: int = 0, port_offset: int = 0) -> InventoryPage:
        """A page of the caller's inventory: hosts (and their ports) matching the filters (find_hosts'
        arguments of the same names), the first without its first `port_offset` ports."""
        hosts, total = await self._stores.inventory.find_hosts(owner, self._query(filters), limit, offset)
        return inventory_page(hosts, total, offset, self._settings.max_answer_bytes, port_offset=port_offset)

    async def top_values(self, owner: str, field: str, *, limit: int = 20, **filters: str | None) -> TopValues:
        """The caller's most common values of `field`, counted in hosts."""
        values = await self._stores.inventory.top_values(owner, field, self._query(filters), limit)
        return TopValues(field=field, values=values)

    @staticmethod
    def _query(filters: Mapping[str, str | int | None]) -> HostQuery:
        """The inventory query for tool arguments: networks and times parsed, Nones dropped."""
        given = {key: value for key, value in filters.items() if value is not None}
        now = time.time()
        for key in ("seen_since", "changed_since"):
            if key in given:
                given[key] = parse_since(str(given[key]), now)  # type: ignore[assignment]
        if "network" in given:
            given["network"] = parse_network(str(given["network"]))  # type: ignore[assignment]
        return HostQuery(**given)  # type: ignore[arg-type]

    async def limits(self, owner: str) -> LimitsAnswer:
        """The caller's limits, and how much of each its scans and schedules use now."""
        limits, used = self.policy.limits(owner), await self._stores.usage.usage(owner)
        used["schedules"] = await self._stores.schedules.count(owner)
        windows = {"scans_per_minute": "the last minute",
                   "concurrent_scans": "nmap runs queued or running now (a shard is one)",
                   "addresses_per_day": "the last 24 hours", "rescans_per_hour": "the last hour",
                   "schedules": "schedules existing now",
                   "probes_per_day": "the last 24 hours; a scan's probes are its addresses x ports"}
        return LimitsAnswer(token=owner, max_rate=self.policy.max_rate(owner), limits=[
            LimitUsage(name=name, limit=getattr(limits, name), used=used[name], window=window)
            for name, window in windows.items()])

    async def workers(self) -> WorkerList:
        """Every pool (configured, or with workers or queued tasks) with its workers."""
        seen = await self._pool_statuses()
        names = sorted({*self.policy.pools, *seen, *( [self._worker.info.pool] if self._worker else [])})
        return WorkerList(pools=[self._overview(name, seen.get(name)) for name in names])

    async def _pool(self, name: str) -> PoolOverview:
        return self._overview(name, (await self._pool_statuses()).get(name))

    async def _pool_statuses(self) -> dict[str, PoolStatus]:
        return {status.pool: status for status in await self._stores.workers.pools(self._stores.lease_seconds)}

    def _overview(self, name: str, status: PoolStatus | None) -> PoolOverview:
        workers = [WorkerStatus(**w) for w in status.workers] if status else []
        return PoolOverview(pool=name, networks=[str(n) for n in self.policy.pools.get(name, ())],
                            queued=status.queued if status else 0, workers_alive=sum(w.alive for w in workers),
                            workers=workers)

    async def health(self) -> str | None:
        """None when scans can run; else what is wrong, in words that reveal no configuration."""
        if not self.accepting:
            return "the server is shutting down"
        try:
            await self._stores.db.ping()
        except DatabaseUnavailable:
            return "the task database is not reachable"
        directory = self._stores.db.directory
        if directory is not None and (disk := disk_problem(directory)):
            return f"the task database's disk is {disk}"
        if not os.access(self._nmap, os.X_OK):
            return "nmap cannot be run"
        return None
