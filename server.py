"""nmap-mcp: nmap as MCP tools over authenticated Streamable HTTP.

This module only wires things together: `create_server(settings, nmap_path)` builds the
FastMCP server whose tools are thin adapters (validate, call the task manager, shape the
answer), `create_app(settings, nmap_path)` the ASGI app, and `main()` the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import logging
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Any, Literal

import uvicorn
from fastmcp import Context, FastMCP
from fastmcp.exceptions import ToolError
from fastmcp.server.dependencies import get_access_token
from fastmcp.tools.function_tool import FunctionTool
from fastmcp.utilities.json_schema import dereference_refs
from mcp.types import ToolAnnotations
from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse

import audit
from audit import AuditLog, AuditMiddleware
from auth import NamedTokenVerifier, ToolScopeMiddleware
from client_configs import render_client_configs
from config import (
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    load_settings,
    write_new_config,
)
from models import Progress, ScanDiff, ScanKind, TaskAnswer, TaskList, TaskStatus
from nmap_options import (
    MAX_COMMAND_LENGTH,
    CommandError,
    describe_allowlist,
    parse_command,
)
from nse_policy import (
    BUILTIN_DENIED_SCRIPTS,
    ScriptPolicy,
    default_script_db,
    load_catalog,
)
from scanner import SandboxUnavailable, build_argv, sandbox_prefix, scan_options
from targets import TargetError, TargetPolicy, parse_networks, resolve_targets
from task_manager import (
    QueueFull,
    TaskAlreadyFinished,
    TaskManager,
    TaskNotFound,
    TaskRecord,
    create_db_engine,
)
from views import (
    capped_diff,
    csv_page,
    diff_results,
    json_page,
    text_page,
    with_requested_names,
)

ToolFunction = Callable[..., Awaitable[Any]]
# A checkout has the VERSION file beside this module; an installed copy has only its metadata.
_VERSION_FILE = Path(__file__).with_name("VERSION")
VERSION = (_VERSION_FILE.read_text(encoding="utf-8").strip() if _VERSION_FILE.exists()
           else importlib.metadata.version("nmap-mcp"))

TaskId = Annotated[
    str,
    Field(
        description="The task_id a scan tool returned",
        pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
    ),
]
Target = Annotated[
    str,
    Field(
        description=(
            "One target: an IPv4 or IPv6 address (192.168.1.10, fd00::5), a CIDR network on its "
            "boundary (192.168.1.0/24), a last-octet range (192.168.1.1-20) or a hostname"
        ),
        min_length=1,
        max_length=253,
    ),
]

class NotComparable(ValueError):
    """diff_scans was given a task without a result."""


_ERROR_CODES: dict[type[Exception], str] = {
    NotComparable: "not_comparable",
    CommandError: "invalid_command",
    TargetError: "invalid_target",
    QueueFull: "queue_full",
    TaskNotFound: "not_found",
    TaskAlreadyFinished: "already_finished",
}
_SCAN_ANNOTATIONS = ToolAnnotations(
    readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=True
)
_CANCEL_ANNOTATIONS = ToolAnnotations(
    readOnlyHint=False, destructiveHint=True, idempotentHint=True, openWorldHint=False
)
_READ_ANNOTATIONS = ToolAnnotations(
    readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False
)
_POLL_HINT = (
    "The scan continues in the background. Call get_task_result with task_id '{id}' "
    "to fetch the result, or the hosts finished so far (get_task_status shows progress)."
)
DEFAULT_PAGE = 50

QUICK_SCAN_DESCRIPTION = """Quick TCP port scan: nmap's 100 most common ports.

Runs `nmap -sT -T4 --top-ports 100 -n` against one target. Usually finishes in under a
second for one host on a local network and in a few seconds for a /24.
Waits up to `timeout` seconds; when the scan takes longer it returns status 'running' and
a task_id while the same scan goes on: fetch it later with get_task_result. A result for the
same target from the last {fresh} s (or the same scan still running) is returned instead of
scanning again, unless rescan is true. The answer lists open ports per host."""

FULL_SCAN_DESCRIPTION = """Full TCP port scan: all 65535 ports with service and version detection.

Runs `nmap -sT -T4 -p- -sV -n` against one target. Takes from about ten seconds for one
nearby host to many minutes for slow or filtered hosts and ranges.
Waits up to `timeout` seconds; when the scan takes longer it returns status 'running' and
a task_id while the same scan goes on: fetch it later with get_task_result. A result for the
same target from the last {fresh} s (or the same scan still running) is returned instead of
scanning again, unless rescan is true. The answer lists open ports per host."""


CUSTOM_SCAN_DESCRIPTION = """Run nmap with your own options, checked against an allowlist.

`command` holds nmap options and targets without 'nmap', e.g. '-sV -p 22,80,443 192.168.1.10'
or '-sT --top-ports 1000 -T4 --open 10.0.0.0/24'. It is split into words without a shell; each
option must be one of the exact spellings below (no abbreviations, no clustered short options;
'--opt=value' and '-p80' also work). The server adds -n, its own XML output, a host timeout
(unless you give --host-timeout) and a scan type when you give none. Output, input-file,
spoofing and debugging options are refused with the reason. --script takes allowed categories
(default, safe, discovery, version) or names of installed scripts in them; intrusive,
exploit, dos, brute, malware, fuzzer, external and broadcast scripts never run.
Duration: from a second (a few ports on one host) to hours (all ports, version detection,
large ranges). Waits up to `timeout` seconds, then returns a task_id while the scan goes on.

Allowed options:
{allowlist}"""


def create_server(settings: Settings, nmap_path: str) -> FastMCP:
    """The FastMCP server with its tools; the task manager starts with its lifespan."""
    manager = TaskManager(
        create_db_engine(settings.effective_database_url()),
        max_concurrent=settings.max_concurrent_tasks,
        max_queued=settings.max_queued_tasks,
        shutdown_grace=settings.shutdown_grace_seconds,
    )
    policies = token_target_policies(settings)
    scripts = script_policy(settings, nmap_path)
    audit_log = AuditLog(Path(settings.audit_log))

    @contextlib.asynccontextmanager
    async def lifespan(_server: FastMCP) -> AsyncIterator[dict[str, object]]:
        await manager.start()
        try:
            yield {}
        finally:
            await manager.stop()
            audit_log.close()

    mcp = FastMCP(
        "nmap-mcp",
        version=VERSION,
        instructions="Network scans with nmap. Scans return a result or a task_id to poll.",
        auth=NamedTokenVerifier(settings.named_secrets(), allow_query_token=settings.allow_query_token),
        lifespan=lifespan,
        middleware=[AuditMiddleware(audit_log), ToolScopeMiddleware(token_tool_scopes(settings))],
        mask_error_details=True,
        strict_input_validation=True,
    )

    async def start_scan(
        kind: ScanKind, options: list[str], targets: list[str], timeout: int, ctx: Context, *, rescan: bool = True
    ) -> TaskAnswer:
        owner = caller()
        display = " ".join(targets)
        with tool_errors():
            resolved = await resolve_targets(targets, policies[owner])
            argv = build_argv(nmap_path, options, resolved.nmap_targets, ipv6=resolved.ipv6,
                              privileged=settings.privileged)
            audit.note(argv=argv, targets=list(resolved.nmap_targets))
            fresh_since = None if rescan else time.time() - settings.result_freshness_seconds
            task, reused = await manager.submit_or_reuse(
                owner, kind, display, argv, settings.max_scan_seconds, fresh_since
            )
            audit.note(task_id=task.id)
            shown = await present(await manager.wait(task.id, owner, timeout, on_progress=progress_reporter(ctx)))
            if not reused:
                return shown
            return shown.model_copy(update={"message": _reuse_note(task) + (f" {shown.message}" if shown.message else "")})

    async def present(
        record: TaskRecord, fmt: str = "json", view: str = "summary", offset: int = 0, limit: int = DEFAULT_PAGE
    ) -> TaskAnswer:
        """Shape a task for the caller: a page of its result (partial while it runs)."""
        base = answer(record).model_copy(update={"format": fmt})
        cap = settings.max_answer_bytes
        if fmt == "xml":
            raw = await manager.raw_xml(record.id, record.owner)
            return base if raw is None else more_hint(text_page(base, raw.decode("utf-8", "replace"), offset=offset,
                                                                cap=cap))
        result = record.result or manager.live_result(record)
        if result is None:
            return base
        result = with_requested_names(result, record.argv, record.target)
        if fmt == "csv":
            return more_hint(csv_page(base, result, offset=offset, limit=limit, cap=cap))
        return more_hint(json_page(base, result, view=view, offset=offset, limit=limit, cap=cap))

    default_wait = settings.sync_timeout
    fresh = settings.result_freshness_seconds

    @inlined_tool(mcp, description=QUICK_SCAN_DESCRIPTION.format(fresh=fresh), annotations=_SCAN_ANNOTATIONS)
    async def quick_scan(
        target: Target,
        ctx: Context,
        timeout: Annotated[int, Field(ge=5, le=300, description="Seconds to wait for the result")] = min(
            default_wait, 300
        ),
        rescan: Annotated[bool, Field(description="Scan again even if a recent result exists")] = False,
    ) -> TaskAnswer:
        options = scan_options(ScanKind.QUICK, privileged=settings.privileged)
        return await start_scan(ScanKind.QUICK, options, [target], timeout, ctx, rescan=rescan)

    @inlined_tool(mcp, description=FULL_SCAN_DESCRIPTION.format(fresh=fresh), annotations=_SCAN_ANNOTATIONS)
    async def full_scan(
        target: Target,
        ctx: Context,
        timeout: Annotated[int, Field(ge=5, le=600, description="Seconds to wait for the result")] = default_wait,
        rescan: Annotated[bool, Field(description="Scan again even if a recent result exists")] = False,
    ) -> TaskAnswer:
        options = scan_options(ScanKind.FULL, privileged=settings.privileged)
        return await start_scan(ScanKind.FULL, options, [target], timeout, ctx, rescan=rescan)

    @inlined_tool(mcp, description=custom_scan_description(settings.privileged), annotations=_SCAN_ANNOTATIONS)
    async def custom_scan(
        command: Annotated[str, Field(min_length=1, max_length=MAX_COMMAND_LENGTH, description=(
            "nmap options and targets, without 'nmap', e.g. '-sV -p 22,80,443 192.168.1.10'"
        ))],
        ctx: Context,
        timeout: Annotated[int, Field(ge=5, le=600, description="Seconds to wait for the result")] = default_wait,
    ) -> TaskAnswer:
        with tool_errors():
            parsed = parse_command(command, scripts, privileged=settings.privileged)
        if "--host-timeout" not in parsed.options:
            parsed.options += ["--host-timeout", f"{settings.custom_host_timeout}s"]
        return await start_scan(ScanKind.CUSTOM, parsed.options, parsed.targets, timeout, ctx)

    @inlined_tool(mcp, annotations=_READ_ANNOTATIONS)
    async def get_task_status(task_id: TaskId) -> TaskAnswer:
        """State, timings and progress (percent, phase, seconds left) of one of your scan
        tasks, without the result. Instant."""
        with tool_errors():
            return answer(await manager.get(task_id, caller()))

    @inlined_tool(mcp, annotations=_READ_ANNOTATIONS)
    async def get_task_result(
        task_id: TaskId,
        format: Annotated[Literal["json", "xml", "csv"], Field(
            description="json: parsed result; xml: nmap's own report; csv: one row per port")] = "json",
        view: Annotated[Literal["summary", "full"], Field(
            description="summary: open ports with service and version; full: every detail")] = "summary",
        offset: Annotated[int, Field(ge=0, description="First host (json, csv) or character (xml)")] = 0,
        limit: Annotated[int, Field(ge=1, le=1000, description="Hosts per page (json, csv)")] = DEFAULT_PAGE,
    ) -> TaskAnswer:
        """The result of one of your scan tasks: once finished, or the hosts done so far
        (partial: true) while it runs or after it was stopped. Answers are paged and capped
        in size; `page.next_offset` says where the rest starts. Instant: it never waits."""
        with tool_errors():
            record = await manager.get(task_id, caller(), with_result=True)
            return await present(record, format, view, offset, limit)

    @inlined_tool(mcp, annotations=_READ_ANNOTATIONS)
    async def diff_scans(task_a: TaskId, task_b: TaskId) -> ScanDiff:
        """What changed between two of your finished scans (a: before, b: after): hosts
        that came up or went down, ports opened or closed, services or versions changed."""
        owner = caller()
        with tool_errors():
            first = await manager.get(task_a, owner, with_result=True)
            second = await manager.get(task_b, owner, with_result=True)
            for record in (first, second):
                if record.result is None:
                    raise NotComparable(f"task {record.id} has no result to compare (it is {record.status.value})")
            diff = diff_results(task_a, first.result, task_b, second.result)  # type: ignore[arg-type]
            return capped_diff(diff, settings.max_answer_bytes)

    @inlined_tool(mcp, annotations=_READ_ANNOTATIONS)
    async def list_tasks(
        status: Annotated[TaskStatus | None, Field(description="Only tasks in this state")] = None,
        limit: Annotated[int, Field(ge=1, le=100, description="At most this many tasks")] = 20,
    ) -> TaskList:
        """Your most recent scan tasks, newest first, without results. Instant."""
        records = await manager.list(caller(), status, limit)
        return TaskList(tasks=[answer(record) for record in records])

    @inlined_tool(mcp, annotations=_CANCEL_ANNOTATIONS)
    async def cancel_task(task_id: TaskId) -> TaskAnswer:
        """Cancel one of your queued or running scans; a running nmap is stopped at once."""
        with tool_errors():
            return answer(await manager.cancel(task_id, caller()))

    @mcp.custom_route("/healthz", methods=["GET"])
    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": VERSION})

    return mcp


def inlined_tool(mcp: FastMCP, **options: Any) -> Callable[[ToolFunction], ToolFunction]:
    """Register a tool with its JSON schemas inlined once, at start-up.

    For 2026-07-28 clients FastMCP lists the tools on every tools/call, and its
    DereferenceRefsMiddleware then re-inlines every $ref of our nested result models each
    time: about 12 ms per call, three quarters of the server's CPU (measured with py-spy).
    Inlined here, that per-call walk finds nothing to do.
    """

    def register(fn: ToolFunction) -> ToolFunction:
        tool = FunctionTool.from_function(fn, **options)
        inlined: dict[str, Any] = {"parameters": dereference_refs(tool.parameters)}
        if tool.output_schema is not None:
            inlined["output_schema"] = dereference_refs(tool.output_schema)
        mcp.add_tool(tool.model_copy(update=inlined))
        return fn

    return register


def token_target_policies(settings: Settings) -> dict[str, TargetPolicy]:
    """Token name -> the target policy its scans get: the server's, narrowed per token."""
    base = TargetPolicy(
        allowed=parse_networks(settings.allowed_targets),
        denied=parse_networks(settings.denied_targets),
        allow_loopback=settings.allow_loopback,
        max_addresses=settings.max_addresses_per_scan,
        max_targets=settings.max_targets_per_scan,
        resolve_timeout=settings.resolve_timeout,
    )
    policies = dict.fromkeys(settings.named_secrets(), base)
    for name, spec in settings.tokens.items():
        if spec.allowed_targets is not None:
            policies[name] = replace(base, token_allowed=parse_networks(spec.allowed_targets))
    return policies


def token_tool_scopes(settings: Settings) -> dict[str, frozenset[str] | None]:
    """Token name -> the tools it may use (None: all)."""
    scopes: dict[str, frozenset[str] | None] = dict.fromkeys(settings.named_secrets())
    for name, spec in settings.tokens.items():
        if spec.tools is not None:
            scopes[name] = frozenset(spec.tools)
    return scopes


def script_policy(settings: Settings, nmap_path: str) -> ScriptPolicy:
    """The NSE policy, over the script database of the nmap that will run."""
    script_db = Path(settings.script_db_path) if settings.script_db_path else default_script_db(nmap_path)
    try:
        catalog = load_catalog(script_db)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read nmap's script database {script_db}: set script_db_path ({e})") from e
    return ScriptPolicy(
        catalog=catalog,
        allowed_categories=tuple(settings.script_categories),
        denied=(*BUILTIN_DENIED_SCRIPTS, *settings.denied_scripts),
        args_allowed={key: re.compile(pattern) for key, pattern in settings.script_args_allowed.items()},
    )


def custom_scan_description(privileged: bool) -> str:
    """custom_scan's description, with the allowlist it enforces."""
    return CUSTOM_SCAN_DESCRIPTION.format(allowlist=describe_allowlist(privileged=privileged))


def more_hint(shown: TaskAnswer) -> TaskAnswer:
    """Say in words how to fetch the rest of a paged result."""
    if shown.page is None or shown.page.next_offset is None:
        return shown
    rest = (f"This answer holds {shown.page.unit} {shown.page.offset}-{shown.page.offset + shown.page.returned - 1}"
            f" of {shown.page.total}; call get_task_result with task_id '{shown.task_id}', format "
            f"'{shown.format}' and offset {shown.page.next_offset} for more.")
    return shown.model_copy(update={"message": f"{shown.message} {rest}" if shown.message else rest})


def _reuse_note(reused: TaskRecord) -> str:
    if reused.status.finished:
        age = time.time() - (reused.finished_at or reused.created_at)
        return f"This is the result of the same scan {age:.0f} s ago; pass rescan=true to scan again."
    return "The same scan was already under way; this is its task. Pass rescan=true to start another."


def progress_reporter(ctx: Context) -> Callable[[Progress], Awaitable[None]]:
    """MCP progress notifications for a waiting call (sent when the client asked for them)."""

    async def report(progress: Progress) -> None:
        left = f", about {progress.remaining_s} s left" if progress.remaining_s is not None else ""
        await ctx.report_progress(progress.percent, 100, f"{progress.phase}: {progress.percent:.0f}%{left}")

    return report


def caller() -> str:
    """The name of the token that authenticated this request."""
    token = get_access_token()
    if token is None or not token.client_id:
        raise ToolError("unauthenticated: this tool needs a valid token")
    return token.client_id


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Turn the errors a caller can act on into ToolErrors with a stable code."""
    try:
        yield
    except tuple(_ERROR_CODES) as e:
        raise ToolError(f"{_ERROR_CODES[type(e)]}: {e}") from e


def answer(record: TaskRecord) -> TaskAnswer:
    """A task's state without its result; unfinished tasks say how to poll."""
    message = None
    if not record.status.finished:
        done = f" ({record.progress.phase}, {record.progress.percent:.0f}%)" if record.progress else ""
        message = f"Scan {record.status.value}{done}. " + _POLL_HINT.format(id=record.id)
    return TaskAnswer(
        status=record.status,
        task_id=record.id,
        kind=record.kind,
        target=record.target,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        message=message,
        error=record.error,
        progress=record.progress,
    )


def create_app(settings: Settings, nmap_path: str) -> object:
    """The Streamable HTTP app: stateless, SSE-capable, Host/Origin protected."""
    return create_server(settings, nmap_path).http_app(
        path=settings.path,
        stateless_http=True,
        json_response=False,
        host_origin_protection=True,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
    )


def find_nmap(configured: str) -> str:
    """Absolute path of the nmap binary; ConfigError when it or its sandbox is missing."""
    found = shutil.which(configured)
    if found is None:
        raise ConfigError(f"nmap not found at '{configured}': install it (apt-get install nmap) or set nmap_path")
    try:
        sandbox_prefix()
    except SandboxUnavailable as e:
        raise ConfigError(str(e)) from e
    return found


def banner(settings: Settings, *, show_token: bool, config_path: Path) -> str:
    """Where the server listens and how to connect each client."""
    names = sorted(settings.named_secrets())
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    url = f"http://{host}:{settings.port}{settings.path}"
    first = names[0]
    secret = settings.named_secrets()[first] if show_token else "<TOKEN>"
    lines = [
        f"nmap-mcp {VERSION} listening on {settings.host}:{settings.port}, endpoint {url}",
        f"tokens: {', '.join(names)} (secrets are in {config_path}; --show-token prints them here)",
    ]
    if not show_token:
        lines.append(f"below, replace <TOKEN> with the secret of token '{first}'")
    if settings.host in ("0.0.0.0", "::"):
        lines.append("listening on all interfaces: replace 127.0.0.1 below with this machine's address")
    return "\n".join(lines) + "\n\n" + render_client_configs(url, secret) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="server.py", description="nmap-mcp: nmap as an MCP server")
    parser.add_argument("-c", "--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--init", action="store_true", help="write a config with a fresh token and exit")
    parser.add_argument("--force", action="store_true", help="with --init: overwrite an existing config")
    parser.add_argument("--show-token", action="store_true", help="print real token secrets in the banner")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config_path: Path = args.config or DEFAULT_CONFIG_PATH
    try:
        if args.init:
            write_new_config(config_path, force=args.force)
            print(f"wrote {config_path.resolve()} with a new token; edit it, then run: python server.py")
            return 0
        if args.config is None and not config_path.exists():
            write_new_config(config_path)
            print(f"no config found: wrote {config_path.resolve()} with a new token")
        settings = load_settings(config_path)
        app = create_app(settings, find_nmap(settings.nmap_path))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(banner(settings, show_token=args.show_token, config_path=config_path.resolve()), flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, lifespan="on")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
