"""The MCP tools: argument types, descriptions and annotations; each tool a few lines that
call the scan service and turn its errors into tool errors with a stable code."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.exceptions import ValidationError as ArgumentsRefused
from fastmcp.tools.function_tool import FunctionTool
from mcp.types import ToolAnnotations
from mcp_types import InputRequiredResult
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import Field

from approvals import input_request
from auth import Identify
from config import Settings
from engagement_store import EngagementNotFound
from engagements import EngagementRefused
from errors import arguments_refused, code_of, tool_errors
from mcp_tasks import opted_in
from models import (
    InventoryPage,
    LimitsAnswer,
    NmapVersion,
    Progress,
    ScanDiff,
    ScanKind,
    ScanPlan,
    ScheduleCreated,
    ScheduleDeleted,
    ScheduleList,
    TaskAnswer,
    TaskEvidence,
    TaskList,
    TaskState,
    TaskStatus,
    TopValues,
    WorkerList,
)
from nmap_options import MAX_COMMAND_LENGTH, CommandError
from policy import Forbidden, NoPool
from scans import DEFAULT_PAGE, Captured, ScanRequest, ScanService, ShuttingDown, TypedScan, capturing
from schedules import Schedules
from targets import TargetError
from tool_schemas import input_schema, output_schema, with_choices, without_properties
from untrusted import UNTRUSTED_HINT

ToolFunction = Callable[..., Awaitable[Any]]
ScanTool = Literal["quick_scan", "full_scan", "custom_scan", "scan"]
# What a scan's own checks refuse it for: plan_scan answers them as a refused plan, not an error.
SCAN_REFUSALS = (TargetError, CommandError, NoPool, Forbidden, ShuttingDown, EngagementRefused, EngagementNotFound)

TASK_ID = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
TaskId = Annotated[str, Field(description="The task_id a scan tool returned", pattern=TASK_ID)]
Target = Annotated[
    str,
    Field(
        description=(
            "One target: an IPv4 or IPv6 address (192.168.1.10, fd00::5), a CIDR network on its "
            "boundary (192.168.1.0/24), a last-octet range (192.168.1.1-20) or a hostname (the "
            "server resolves it, unless this token is held to addresses)"
        ),
        min_length=1,
        max_length=253,
    ),
]

Network = Annotated[
    str | None,
    Field(max_length=50, description="Only hosts in this network or address: 10.0.0.0/24, 10.0.0.5, fd00::/64"),
]
Since = Annotated[
    str | None,
    Field(max_length=40, description="A duration back from now (24h, 7d, 2w) or an ISO date (2026-11-24)"),
]
PoolName = Annotated[
    str | None,
    Field(description="Scanner pool to run in (list_workers shows them); default: the pool that reaches the target",
          pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"),
]
EngagementName = Annotated[str | None, Field(max_length=64, description="Engagement to run under; default: yours")]
SkipHostDiscovery = Annotated[bool, Field(description=(
    "Skip host discovery (-Pn): scan every target as up, also a host whose firewall drops nmap's ping probes "
    "and so looks down. Slower on ranges with few hosts"))]
PortOffset = Annotated[int, Field(ge=0, le=200_000, description=(
    "Skip this many ports of the page's first host: the port_offset a page's `cut` names to fetch "
    "the rest of a host that did not fit in one answer"))]
TargetText = Annotated[str, Field(min_length=1, max_length=1000)]
TargetList = Annotated[list[TargetText], Field(min_length=1, max_length=64)]
ScheduleId = Annotated[
    str,
    Field(
        description="The schedule_id schedule_scan returned",
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    ),
]
# Annotations are resolved in this module's namespace, so the words cannot name the configured cap.
WAIT_TEXT = ("Seconds to wait for the result; a call waits at most the server's max_call_wait_seconds "
             "(50 s by default), then answers with the task_id while the scan goes on")
_SCAN_ANNOTATIONS = ToolAnnotations(
    read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=True
)
_CANCEL_ANNOTATIONS = ToolAnnotations(
    read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False
)
READ_ANNOTATIONS = ToolAnnotations(
    read_only_hint=True, destructive_hint=False, idempotent_hint=True, open_world_hint=False
)

QUICK_SCAN_DESCRIPTION = """Quick TCP port scan: nmap's 100 most common ports.

Runs `nmap -sT -T4 --top-ports 100 -n` against one target. Usually finishes in under a
second for one host on a local network and in a few seconds for a /24.
Waits up to `timeout` seconds; when the scan takes longer it returns status 'running' and
a task_id while the same scan goes on: fetch it later with get_task_result. A result for the
same target from the last {fresh} s (or the same scan still running) is returned instead of
scanning again, unless rescan is true. The answer lists open ports per host; hosts that did
not answer host discovery are reported down with a warning (a firewall may drop the probes):
skip_host_discovery=true (-Pn) scans them anyway."""

FULL_SCAN_DESCRIPTION = """Full TCP port scan: all 65535 ports, then service and version detection.

Two phases, one task: port discovery (`nmap -sT -T4 -p 1-65535 --min-rate 1000 --max-retries 2 -n`,
about a second for one nearby host), then version detection (`-sV`) on the open ports only,
stopped after {version} s. If `timeout` passes during version detection, the answer is
status 'running' with the open ports already found (partial: true, progress names the
phase); fetch the versions later with get_task_result. A result for the same target from
the last {fresh} s (or the same scan still running) is returned instead of scanning again,
unless rescan is true. The answer lists open ports per host; a service inside TLS is named as
nmap names it (ssl/http). skip_host_discovery=true (-Pn) scans hosts that drop ping probes."""

CUSTOM_SCAN_DESCRIPTION = """Run nmap with your own options, checked against an allowlist.

`command` holds nmap options and targets, e.g. '-sV -p 22,80,443 192.168.1.10' or
'-sT --top-ports 1000 -T4 --open 10.0.0.0/24' (a leading 'nmap' is fine). It is split into
words without a shell; options must be spelled exactly (no abbreviations or clusters). The
server adds -n, its own XML output, a host timeout and a scan type when you give none; a
refused option comes back with the reason. The allowed options are in the resource
nmap://help/custom_scan; the `scan` tool asks for the same scans field by field.
Duration: a second (a few ports) to hours (all ports, versions, large ranges). Waits up to
`timeout` seconds, then returns a task_id while the scan goes on."""

SCAN_DESCRIPTION = """Scan with nmap, choosing each part of the scan from a short list.

targets: addresses, networks (10.0.0.0/24), ranges (10.0.0.1-20) or hostnames, as a list or in
one string separated by spaces or commas. {types} ports (22,80,443 or 1-1024)
or else top_ports (the N most common). Waits up to `timeout` seconds, then returns a task_id
while the scan goes on; the answer lists open ports per host."""
PRIVILEGED_SCAN_TYPES = "scan_type connect (TCP), syn (SYN), udp, or ping (find hosts, no ports)."
UNPRIVILEGED_SCAN_TYPES = ("scan_type connect (TCP) or ping (find hosts, no ports): this server runs no raw-packet "
                           "scans (syn, udp, OS detection).")
# What an unprivileged server always refuses (nmap needs raw packets for them), so never offers.
RAW_PACKET_SCAN_TYPES = ("syn", "udp")
RAW_PACKET_PARAMETERS = ("os_detection",)

PLAN_SCAN_DESCRIPTION = """Dry run of a scan tool's `arguments` (checked as that tool checks them): the verdict
and the code and reason the call would get now (rate_limited included), the exact argv, pool
and workers, probes (addresses x ports_per_address), and an estimate from completed scans of
that kind in that pool (based_on: how many). Nothing is queued or counted. Instant."""

SCHEDULE_SCAN_DESCRIPTION = """Run a scan again and again, and hear what changed.

kind 'quick' or 'full' scans `target` as quick_scan or full_scan would; 'custom' runs `command`
as custom_scan would. It is checked now exactly as that tool would check it, and refused now if
it would be. `every`: an interval (90s, 15m, 1h, 1d; the first run is at once) or a 5-field cron
expression in UTC ('0 3 * * *': daily at 03:00); at most every {minimum} s. Each run is a scan
task of yours (list_tasks, get_task_result show it). When a run finds a change against the
previous completed run of the schedule (hosts up or down, ports opened or closed, services or
versions changed), list_schedules shows it and `webhook_url`, if given, receives it as a JSON
POST signed with HMAC-SHA256 (header X-Nmap-MCP-Signature: sha256=<hex of the raw body>) under
the webhook_secret in this answer, which is shown only once. The server allows webhooks only to
the URLs its operator listed, with a plain path (no '..', ';', '%' escapes or backslashes), and
to internal addresses only when listed too. Runs missed while the server was down are run once
when it is back."""


def register_tools(
    mcp: FastMCP, scans: ScanService, settings: Settings, identify: Identify, schedules: Schedules
) -> dict[str, dict[str, Any]]:
    """Add every tool to `mcp`; each one acts for the caller `identify` names. Returns each
    tool's input schema (for the words of argument errors)."""
    schemas: dict[str, dict[str, Any]] = {}

    def caller() -> str:
        name = identify()
        if name is None:
            raise ToolError("unauthenticated: this tool needs a valid token")
        return name

    async def scanned(ctx: Context, request: Callable[[], ScanRequest], timeout_s: int,
                      rescan: bool = False) -> TaskAnswer | InputRequiredResult:
        """A scan tool's answer. When its engagement holds the scan for a person's yes, a
        2026-07-28 client that can show a form is asked for the requester's reason (an
        input_required result naming the held task); its retry carrying the answer passes the
        reason to the approvers (or, declined, withdraws the scan) and queues nothing new."""
        owner = caller()
        if ctx.request_state is not None:
            return await scans.answer_hold(owner, ctx.request_state, ctx.input_responses)
        shown = await scans.scan(owner, request(), timeout_s=timeout_s, rescan=rescan,
                                 on_progress=progress_reporter(ctx))
        if shown.status is TaskStatus.AWAITING_APPROVAL and shows_forms(ctx):
            return InputRequiredResult(input_requests=input_request(shown.message or ""), request_state=shown.task_id)
        return shown

    default_wait = settings.sync_timeout
    fresh = settings.result_freshness_seconds

    @inlined_tool(mcp, schemas, description=QUICK_SCAN_DESCRIPTION.format(fresh=fresh), annotations=_SCAN_ANNOTATIONS,
                  target_text=True)
    async def quick_scan(
        target: Target,
        ctx: Context,
        timeout: Annotated[int, Field(ge=5, le=300, description=WAIT_TEXT)] = min(
            default_wait, 300
        ),
        rescan: Annotated[bool, Field(description="Scan again even if a recent result exists")] = False,
        pool: PoolName = None,
        skip_host_discovery: SkipHostDiscovery = False,
        engagement: EngagementName = None,
    ) -> TaskAnswer | InputRequiredResult:
        with tool_errors():
            return await scanned(ctx, lambda: scans.quick(target, pool, skip_host_discovery=skip_host_discovery,
                                                          engagement=engagement), timeout, rescan)

    @inlined_tool(mcp, schemas, description=FULL_SCAN_DESCRIPTION.format(fresh=fresh,
                  version=settings.version_detection_seconds), annotations=_SCAN_ANNOTATIONS, target_text=True)
    async def full_scan(
        target: Target,
        ctx: Context,
        timeout: Annotated[int, Field(ge=5, le=600, description=WAIT_TEXT)] = default_wait,
        rescan: Annotated[bool, Field(description="Scan again even if a recent result exists")] = False,
        pool: PoolName = None,
        skip_host_discovery: SkipHostDiscovery = False,
        engagement: EngagementName = None,
    ) -> TaskAnswer | InputRequiredResult:
        with tool_errors():
            return await scanned(ctx, lambda: scans.full(target, pool, skip_host_discovery=skip_host_discovery,
                                                         engagement=engagement), timeout, rescan)

    @inlined_tool(mcp, schemas, description=CUSTOM_SCAN_DESCRIPTION, annotations=_SCAN_ANNOTATIONS, target_text=True)
    async def custom_scan(
        command: Annotated[str, Field(min_length=1, max_length=MAX_COMMAND_LENGTH, description=(
            "nmap options and targets, without 'nmap', e.g. '-sV -p 22,80,443 192.168.1.10'"
        ))],
        ctx: Context,
        timeout: Annotated[int, Field(ge=5, le=600, description=WAIT_TEXT)] = default_wait,
        pool: PoolName = None,
        engagement: EngagementName = None,
    ) -> TaskAnswer | InputRequiredResult:
        with tool_errors():
            return await scanned(ctx, lambda: scans.custom(command, pool, engagement=engagement), timeout)

    async def scan(
        targets: Annotated[TargetText | TargetList, Field(description=(
            "What to scan: 192.168.1.10, 192.168.1.0/24, 192.168.1.1-20 or host.example.com; several as a "
            "list, or in one string separated by spaces or commas"))],
        ctx: Context,
        scan_type: Annotated[Literal["connect", "syn", "udp", "ping"], Field(
            description="connect (TCP), syn (TCP SYN), udp, or ping (find hosts, no ports)")] = "connect",
        ports: Annotated[str | None, Field(max_length=200, pattern=r"^[0-9TU:,-]+$", description=(
            "Ports to scan: 22,80,443 or 1-1024; when given, top_ports is not used"))] = None,
        top_ports: Annotated[int, Field(ge=1, le=65535, description="Scan the N most common ports")] = 100,
        service_versions: Annotated[bool, Field(description="Detect services and versions (-sV)")] = False,
        os_detection: Annotated[bool, Field(description="Guess the operating system (-O)")] = False,
        scripts: list[str] | None = None,
        skip_host_discovery: SkipHostDiscovery = False,
        timing: Annotated[Literal["T2", "T3", "T4"], Field(description="T2 polite, T3 normal, T4 fast")] = "T3",
        timeout: Annotated[int, Field(ge=5, le=600, description=WAIT_TEXT)] = default_wait,
        pool: PoolName = None,
        engagement: EngagementName = None,
    ) -> TaskAnswer | InputRequiredResult:
        given = targets if isinstance(targets, str) else tuple(targets)
        spec = TypedScan(given, scan_type, ports, top_ports, service_versions, os_detection, tuple(scripts or ()),
                         skip_host_discovery, timing)
        with tool_errors():
            return await scanned(ctx, lambda: scans.typed(spec, pool, engagement=engagement), timeout)

    # The categories this server allows, as an enum a model can pick from: known only now,
    # so the annotation is set here (a name local to this function cannot be resolved later).
    categories = Literal[tuple(settings.script_categories)]  # type: ignore[valid-type]
    scan.__annotations__["scripts"] = Annotated[list[categories] | None, Field(  # type: ignore[valid-type]
        max_length=8, description="NSE script categories to run")]
    inlined_tool(mcp, schemas, description=scan_description(settings.privileged), annotations=_SCAN_ANNOTATIONS,
                 target_text=True, shape=None if settings.privileged else unprivileged_scan)(scan)

    @inlined_tool(mcp, schemas, description=PLAN_SCAN_DESCRIPTION, annotations=READ_ANNOTATIONS)
    async def plan_scan(
        tool: ScanTool,
        arguments: Annotated[dict[str, Any], Field(description="What that tool takes")],
    ) -> ScanPlan:
        owner = caller()
        with tool_errors():
            return await plan_of(mcp, scans, owner, tool, arguments, schemas.get(tool, {}))

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def nmap_version() -> NmapVersion:
        """The nmap that runs the scans: its version, platform and libraries, whether raw-packet
        scans (syn, udp, OS detection) are allowed here, the script categories scans may use,
        and this server's version. Instant."""
        with tool_errors():
            return await scans.nmap_version()

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def get_task_status(task_id: TaskId) -> TaskState:
        """State, timings and progress (percent, phase, seconds left) of one of your scan
        tasks, without the result. Instant."""
        with tool_errors():
            return await scans.status(caller(), task_id)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def get_task_evidence(task_id: TaskId) -> TaskEvidence:
        """For a report: what ran for one of your tasks, when, and SHA-256 of what it produced. Instant."""
        with tool_errors():
            return await scans.evidence(caller(), task_id)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS, target_text=True)
    async def get_task_result(
        task_id: TaskId,
        format: Annotated[Literal["json", "xml", "csv"], Field(
            description="json: parsed result; xml: nmap's own report (the targets' text unmarked); csv: one row "
                        "per port")] = "json",
        view: Annotated[Literal["summary", "full"], Field(
            description="summary: open ports with service and version; full: every detail")] = "summary",
        offset: Annotated[int, Field(ge=0, description="First host (json, csv) or character (xml)")] = 0,
        limit: Annotated[int, Field(ge=1, le=1000, description="Hosts per page (json, csv)")] = DEFAULT_PAGE,
        port_offset: PortOffset = 0,
    ) -> TaskAnswer:
        """The result of one of your scan tasks: once finished, or what nmap found so far
        (partial: true) while it runs or after it stopped: the hosts it finished, and each
        open port within about a second of nmap finding it, on a host marked partial: true
        until nmap reports the whole host. Answers are paged and capped in size;
        `page.next_offset` says where the rest starts. A host with more ports than one answer
        holds comes alone with the ports that fit, and `page.cut` says how to fetch the rest of
        them. Instant: it never waits."""
        with tool_errors():
            return await scans.result(caller(), task_id, format, view, offset, limit, port_offset)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS, target_text=True)
    async def diff_scans(task_a: TaskId, task_b: TaskId) -> ScanDiff:
        """What changed between two of your finished scans (a: before, b: after): hosts
        that came up or went down, ports opened or closed, services or versions changed."""
        with tool_errors():
            return await scans.diff(caller(), task_a, task_b)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def list_tasks(
        status: Annotated[TaskStatus | None, Field(description="Only tasks in this state")] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="At most this many tasks")] = 20,
    ) -> TaskList:
        """Your most recent scan tasks, newest first, without results. Instant."""
        with tool_errors():
            return await scans.list_tasks(caller(), status, limit)

    @inlined_tool(mcp, schemas, annotations=_CANCEL_ANNOTATIONS)
    async def cancel_task(task_id: TaskId) -> TaskState:
        """Cancel one of your queued or running scans; a running nmap is stopped at once."""
        with tool_errors():
            return await scans.cancel(caller(), task_id)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS, target_text=True)
    async def find_hosts(
        network: Network = None,
        port: Annotated[int | None, Field(ge=1, le=65535, description="Only hosts with this port")] = None,
        protocol: Annotated[Literal["tcp", "udp"] | None, Field(description="Port protocol")] = None,
        state: Annotated[Literal["open", "closed", "filtered", "open|filtered", "any"] | None, Field(
            description="State of the ports shown, default open; 'any' shows every state")] = None,
        service: Annotated[str | None, Field(max_length=64,
                                             description="nmap service name: ssh, http, ms-wbt-server")] = None,
        product: Annotated[str | None, Field(max_length=200, description="Product, any case: OpenSSH, nginx")] = None,
        version_prefix: Annotated[str | None, Field(max_length=200,
                                                    description="Version starts with, any case: 7. or 1.18")] = None,
        cpe: Annotated[str | None, Field(max_length=200,
                                         description="CPE contains, any case: cpe:/a:openbsd:openssh")] = None,
        script: Annotated[str | None, Field(max_length=64, description="An NSE script reported on the port")] = None,
        seen_since: Since = None,
        changed_since: Since = None,
        limit: Annotated[int, Field(ge=1, le=1000, description="Hosts per page")] = DEFAULT_PAGE,
        offset: Annotated[int, Field(ge=0, description="First host of the page")] = 0,
        port_offset: PortOffset = 0,
    ) -> InventoryPage:
        """Search what your scans have found, across all of them: the latest known state of every
        host and port. Product, version and CPE stay as the last version scan (-sV, full_scan)
        found them, whatever scans came after (version_confirmed_at, version_task_id say which).
        'Which hosts expose RDP?' is port=3389; 'where does OpenSSH 7 still run?' is
        product='OpenSSH', version_prefix='7.'; 'what changed on 10.0.0.0/24 this week?' is
        network='10.0.0.0/24', changed_since='7d', state='any': hosts that came up or went down
        (with the ports they had) and ports whose state or version changed. Hosts a later scan
        found down, and ports it found closed, say so with when it changed. Instant; paged and
        capped (a host with more ports than one answer holds comes alone, and `page.cut` says how
        to fetch the rest)."""
        with tool_errors():
            filters = {"network": network, "port": port, "protocol": protocol, "state": state, "service": service,
                       "product": product, "version_prefix": version_prefix, "cpe": cpe, "script": script,
                       "seen_since": seen_since, "changed_since": changed_since}
            return await scans.find_hosts(caller(), filters, limit=limit, offset=offset, port_offset=port_offset)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS, target_text=True)
    async def top_values(
        field: Annotated[Literal["port", "service", "product", "version", "os", "status"], Field(
            description="What to count: open ports, services, products, product versions, OS guesses, host status")],
        network: Network = None,
        seen_since: Since = None,
        limit: Annotated[int, Field(ge=1, le=100, description="At most this many values")] = 20,
    ) -> TopValues:
        """The most common values of one field across your inventory, counted in hosts (ties in
        code point order), e.g. the open ports or products seen most on a network; products and
        versions as the last version scan of each port found them. Instant."""
        with tool_errors():
            return await scans.top_values(caller(), field, limit=limit, network=network, seen_since=seen_since)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def get_limits() -> LimitsAnswer:
        """Your token's limits (scans per minute, concurrent scans, addresses per day, forced
        rescans per hour, schedules, probes per day) and how much of each you use now, and the
        packets per second of each nmap run (max_rate). A scan or schedule past one is refused
        with rate_limited, saying when to retry or what to delete. Instant."""
        with tool_errors():
            return await scans.limits(caller())

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS)
    async def list_workers() -> WorkerList:
        """Scanner pools: the networks each reaches, its workers (alive, capacity, running,
        last heartbeat) and how many tasks wait in its queue. Instant."""
        with tool_errors():
            return await scans.workers()

    @inlined_tool(mcp, schemas, description=SCHEDULE_SCAN_DESCRIPTION.format(minimum=settings.min_schedule_seconds),
                  annotations=_SCAN_ANNOTATIONS)
    async def schedule_scan(
        kind: Annotated[Literal["quick", "full", "custom"], Field(description="The scan tool each run uses")],
        every: Annotated[str, Field(min_length=2, max_length=100, description=(
            "How often: 90s, 15m, 1h, 1d, or a 5-field cron expression in UTC such as '*/30 * * * *'"))],
        target: Annotated[str | None, Field(min_length=1, max_length=253, description=(
            "quick and full: one target, as quick_scan takes it"))] = None,
        command: Annotated[str | None, Field(min_length=1, max_length=MAX_COMMAND_LENGTH, description=(
            "custom: nmap options and targets, as custom_scan takes them"))] = None,
        webhook_url: Annotated[str | None, Field(max_length=2000, description=(
            "Where changes are POSTed; must fall under a URL this server allows"))] = None,
        engagement: EngagementName = None,
    ) -> ScheduleCreated:
        with tool_errors():
            return await schedules.create(caller(), ScanKind(kind), target, command, every, webhook_url, engagement)

    @inlined_tool(mcp, schemas, annotations=READ_ANNOTATIONS, target_text=True)
    async def list_schedules(
        limit: Annotated[int, Field(ge=1, le=100, description="At most this many schedules")] = 100,
        offset: Annotated[int, Field(ge=0, description="First schedule of the page")] = 0,
    ) -> ScheduleList:
        """Your schedules, oldest first: what each scans and how often, its next run, its last run's
        task and status, and the last change its runs found (with the webhook's delivery). Paged
        and capped: `page.next_offset` says where the rest starts. Instant."""
        with tool_errors():
            return await schedules.list_schedules(caller(), limit, offset)

    @inlined_tool(mcp, schemas, annotations=_CANCEL_ANNOTATIONS)
    async def delete_schedule(schedule_id: ScheduleId) -> ScheduleDeleted:
        """Delete one of your schedules: it runs no more. A run under way finishes as a normal task."""
        with tool_errors():
            return await schedules.delete(caller(), schedule_id)

    return schemas


async def plan_of(mcp: FastMCP, scans: ScanService, owner: str, tool: str, arguments: dict[str, Any],
                  schema: dict[str, Any]) -> ScanPlan:
    """plan_scan's answer: the scan `tool` would run for `arguments`, or why it would be refused."""
    if not scans.policy.may(owner, tool):
        return ScanPlan(tool=tool, verdict="refused", code="forbidden", reason=f"this token may not use {tool}")
    try:
        request, rescan = await requested_scan(mcp, tool, arguments, schema)
        plan, refusal = await scans.plan(owner, tool, request, rescan=rescan)
    except ToolError as e:  # the tool's own refusal of its arguments, coded as a call gets it
        code, _, reason = str(e).partition(": ")
        return ScanPlan(tool=tool, verdict="refused", code=code, reason=reason)
    except SCAN_REFUSALS as e:
        return ScanPlan(tool=tool, verdict="refused", code=code_of(e), reason=str(e))
    if refusal is None:
        return plan
    return plan.model_copy(update={"verdict": "refused", "code": code_of(refusal), "reason": str(refusal)})


async def requested_scan(mcp: FastMCP, tool: str, arguments: dict[str, Any],
                         schema: dict[str, Any]) -> tuple[ScanRequest, bool]:
    """The request (and rescan) scan `tool` builds from `arguments`: the tool itself runs, with
    FastMCP's validation of its arguments, up to the point where it would scan."""
    found = await mcp.get_tool(tool)
    assert isinstance(found, FunctionTool)
    try:
        with capturing():
            await found.run(arguments)
    except Captured as e:
        return e.request, e.rescan
    except ArgumentsRefused as e:
        raise arguments_refused(e, tool, schema) from e
    raise RuntimeError(f"{tool} returned without asking for a scan")


def inlined_tool(
    mcp: FastMCP, schemas: dict[str, dict[str, Any]], *, target_text: bool = False,
    shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None, **options: Any
) -> Callable[[ToolFunction], ToolFunction]:
    """Register a tool with its JSON schemas shaped and inlined once, at start-up (tool_schemas),
    its input schema then passed through `shape`; a tool whose answers carry `target_text`
    (what scanned hosts wrote) says where it is and what it is.

    For 2026-07-28 clients FastMCP lists the tools on every tools/call, and its
    DereferenceRefsMiddleware then re-inlines every $ref of our nested result models each
    time: about 12 ms per call, three quarters of the server's CPU (measured with py-spy).
    Inlined here, that per-call walk finds nothing to do.
    """

    def register(fn: ToolFunction) -> ToolFunction:
        tool = FunctionTool.from_function(fn, **options)
        parameters = input_schema(tool.parameters)
        inlined: dict[str, Any] = {"parameters": shape(parameters) if shape else parameters}
        if target_text:
            inlined["description"] = f"{tool.description} {UNTRUSTED_HINT}"
        if tool.output_schema is not None:
            inlined["output_schema"] = output_schema(tool.output_schema)
        mcp.add_tool(tool.model_copy(update=inlined))
        schemas[tool.name] = inlined["parameters"]
        return fn

    return register


def scan_description(privileged: bool) -> str:
    """The `scan` tool's description, naming only the scan types this server runs."""
    return SCAN_DESCRIPTION.format(types=PRIVILEGED_SCAN_TYPES if privileged else UNPRIVILEGED_SCAN_TYPES)


def unprivileged_scan(schema: dict[str, Any]) -> dict[str, Any]:
    """The `scan` schema of a server without raw packets: no syn, udp or os_detection on offer
    (asked for anyway, they are refused with the reason, as custom_scan refuses -sS)."""
    runnable = [kind for kind in schema["properties"]["scan_type"]["enum"] if kind not in RAW_PACKET_SCAN_TYPES]
    return with_choices(without_properties(schema, RAW_PACKET_PARAMETERS), "scan_type", runnable,
                        "connect (TCP) or ping (find hosts, no ports)")


def shows_forms(ctx: Context) -> bool:
    """Whether the client of this call can be asked for input in the call's own answer: a
    2026-07-28 client that shows form elicitations, without MCP Tasks (whose task carries its
    input requests instead, mcp_tasks.py)."""
    request = ctx.request_context
    if request is None or request.protocol_version not in MODERN_PROTOCOL_VERSIONS or opted_in(ctx):
        return False
    capabilities = ctx.session.client_capabilities
    elicitation = capabilities.elicitation if capabilities is not None else None
    return elicitation is not None and (elicitation.form is not None or elicitation.url is None)


def progress_reporter(ctx: Context) -> Callable[[Progress], Awaitable[None]]:
    """MCP progress notifications for a waiting call (sent when the client asked for them),
    each with a higher percent than the one before, as the MCP spec requires."""
    sent = -1.0

    async def report(progress: Progress) -> None:
        nonlocal sent
        if progress.percent <= sent:
            return
        sent = progress.percent
        left = f", about {progress.remaining_s} s left" if progress.remaining_s is not None else ""
        await ctx.report_progress(progress.percent, 100, f"{progress.phase}: {progress.percent:.0f}%{left}")

    return report
