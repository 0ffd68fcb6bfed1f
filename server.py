"""nmap-mcp: nmap as MCP tools over authenticated Streamable HTTP.

This module only wires things together: `create_server(settings, nmap_path)` builds the
FastMCP server and the parts it runs (task store, scan worker, scan service, scheduler), `create_app`
the ASGI app, and `main()` the command line: serve (API and worker), `--api` (serve only),
`--worker` (scan only, no HTTP listener).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import gc
import getpass
import importlib.metadata
import logging
import os
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import uvicorn
from fastmcp import FastMCP
from fastmcp.server.auth import MultiAuth
from fastmcp.server.auth.oauth_proxy import OAuthProxy
from sse_starlette.sse import AppStatus
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp

from api_keys import config_line, expiry_notes, secret_sha256
from approvals import ApprovalDesk, expire_forever
from argv_check import ArgvCheck
from audit import AuditLog, AuditMiddleware, Auditor, verify_chain
from auth import NamedTokenVerifier, ToolScopeMiddleware, token_name
from client_configs import (
    CLIENTS,
    LOCAL_CLIENTS,
    LOCAL_SERVER_NAME,
    UnknownClient,
    render_client_config,
    render_client_configs,
)
from config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_TOKEN_NAME,
    INITIAL_TOKEN_FILE,
    MIN_SECRET_LENGTH,
    PLACEHOLDER_DIGESTS,
    ConfigError,
    ConfigMissing,
    Settings,
    load_settings,
    new_secret,
    write_first_config,
    write_new_config,
)
from dashboard import Dashboard, register_dashboard
from db import DatabaseUnavailable, shown_url
from engagement_tools import EngagementBook, register_engagement_tools
from errors import PromptArgumentCheck, ToolErrorMiddleware
from evidence import NothingMatches, UnreadableArchive, export_evidence, verify_archive
from evidence_store import EvidenceFilter, NoDatabase
from evidence_store import opened as opened_evidence
from http_edge import JsonRpcBodyCheck, edge_app
from logs import LogContext, configure_logging
from mcp_tasks import ScanTasks
from metrics import Metrics, MetricsEndpoint, metrics_listener
from oauth import RoleBook, auth_provider
from policy import Policy
from resources import INSTRUCTIONS, register_resources
from retention import upkeep_forever
from sandbox import Sandbox, SandboxUnavailable, check_runs, confinement
from scans import ScanService
from schedules import Scheduler, Schedules
from stores import Stores
from supervisor import Supervisor
from throttle import FailedTokenThrottle
from tools import register_tools
from ui_sign_in import SessionCookieBearer, UiSignIn
from worker import Worker, fold_stale_forever, resolve_expired_forever

# A checkout has the VERSION file beside this module; an installed copy has only its metadata.
_VERSION_FILE = Path(__file__).with_name("VERSION")
VERSION = (_VERSION_FILE.read_text(encoding="utf-8").strip() if _VERSION_FILE.exists()
           else importlib.metadata.version("nmap-mcp"))
logger = logging.getLogger(__name__)
# CAP_NET_ADMIN (12) and CAP_NET_RAW (13), as bits of a capability set.
RAW_SOCKET_CAPABILITIES = 1 << 12 | 1 << 13
# Allocations between two collections of the youngest generation (see settle_heap).
GC_YOUNG_ALLOCATIONS = 20_000
# What client configurations show in place of a secret that is not printed.
TOKEN_PLACEHOLDER = "<TOKEN>"


class Role(enum.StrEnum):
    """What one process does: everything (the default), the API only, scans only, or serve
    one local client over stdio.

    A stdio process is started by a desktop app, often with the server's own config and so on
    its database, and ends when the app quits: its worker runs only its own caller's tasks
    (`stdio_caller`), never another token's, whose scan would end `interrupted` with it. Its
    caller's tasks stay open to the server's workers (same pool, same policy): one the app
    left queued when it quit is still run."""

    ALL = "all"
    API = "api"
    WORKER = "worker"
    STDIO = "stdio"


class Runtime:
    """The running parts of one process, started and stopped in a written-down order.

    Stop: refuse new scans and stop the scheduler (it gives its lease back); stop the worker (no
    more claims, running scans get their grace period, the rest are recorded interrupted); then
    release the calls still waiting, which answer with their task and the state it ended in;
    then close the store.
    """

    def __init__(self, settings: Settings, nmap_path: str, role: Role) -> None:
        self.metrics = Metrics()
        # One per process: every listener of it counts refused tokens together.
        self.throttle = FailedTokenThrottle(settings.failed_token_limit, settings.failed_token_window_seconds)
        self.audit_log = AuditLog(Path(settings.audit_log))
        self.auditor = Auditor(self.audit_log, on_verdict=self.metrics.tool_call, fail_open=settings.audit_fail_open)
        self.stores = Stores.open(
            settings.effective_database_url(),
            max_queued=settings.max_queued_tasks,
            lease_seconds=settings.lease_seconds,
            timeout_s=settings.database_timeout_seconds,
            on_unavailable=self.metrics.database_error,
        )
        policy = Policy(settings, nmap_path, RoleBook(self.stores.people))
        # Who nmap runs as and what it may touch (main() has checked that nmap starts so).
        self.sandbox = confinement(settings.nmap_user, privileged=settings.privileged, nmap_path=nmap_path)
        stdio = role is Role.STDIO
        self.worker = None if role is Role.API else Worker(
            self.stores.workers,
            ArgvCheck.of_worker(nmap_path, policy, privileged=settings.privileged, pool=settings.pool,
                                engagements=self.stores.engagements, approvals=self.stores.approvals),
            name=(settings.worker_name or socket.gethostname()) + (" stdio" if stdio else ""),
            owner=settings.stdio_caller if stdio else None,
            pool=settings.pool,
            capacity=settings.max_concurrent_tasks,
            grace_seconds=settings.shutdown_grace_seconds,
            sandbox=self.sandbox.prefix,
            version_seconds=settings.version_detection_seconds,
            buffer_hosts=settings.scan_buffer_hosts,
            metrics=self.metrics,
        )
        self.service = ScanService(self.stores, policy, settings, nmap_path, self.worker, VERSION,
                                   sandbox=self.sandbox.prefix)
        self.schedules = Schedules(self.stores.schedules, self.service, settings)
        self.scheduler = Scheduler(self.stores, self.schedules, self.service, settings, self.auditor,
                                   name=settings.worker_name or socket.gethostname())
        # Watches every background loop of the process; one that dies stops the process.
        self.supervisor = Supervisor()
        self._retention_days = settings.retention_days
        self._engagements = settings.engagements
        self._drained = False

    async def start(self) -> None:
        await self.stores.start(self.supervisor)
        await self.stores.engagements.load_config(self._engagements)
        self.supervisor.start("lease-reaper", resolve_expired_forever(
            self.stores.workers, self.stores.db, max(self.stores.lease_seconds / 4, 0.5)))
        self.supervisor.start("inventory-folds", fold_stale_forever(
            self.stores.workers, max(self.stores.lease_seconds / 4, 0.5)))
        self.supervisor.start("retention", upkeep_forever(self.stores, self._retention_days))
        self.supervisor.start("approval-expiry", expire_forever(self.stores.approvals, self.auditor))
        if self.worker is not None:
            await self.worker.start(self.supervisor)
        await self.scheduler.start(self.supervisor)
        settle_heap()

    async def drain(self) -> None:
        """Everything of `stop` but closing the store; safe to call twice."""
        if self._drained:
            return
        self._drained = True
        self.service.accepting = False
        await self.scheduler.stop()
        if self.worker is not None:
            await self.worker.stop()
        self.service.closing.set()

    async def stop(self) -> None:
        await self.drain()
        await self.supervisor.stop()
        self.service.resolver.close()
        await self.stores.stop()
        self.audit_log.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()


def create_server(settings: Settings, nmap_path: str, *, role: Role = Role.ALL) -> tuple[FastMCP, Runtime]:
    """The FastMCP server with its tools, and the runtime its lifespan starts and stops.

    Over HTTP every call carries a token whose name is the caller; over stdio (Role.STDIO: a
    local client that started this process) the caller is `stdio_caller`."""
    runtime = Runtime(settings, nmap_path, role)
    stdio = role is Role.STDIO
    identify = (lambda: settings.stdio_caller) if stdio else token_name

    @contextlib.asynccontextmanager
    async def lifespan(_server: FastMCP) -> AsyncIterator[dict[str, object]]:
        async with runtime.running():
            yield {}

    auth = None if stdio else auth_provider(settings.oauth, settings.roles, NamedTokenVerifier(settings.api_keys()),
                                            runtime.service.policy.people)
    mcp = FastMCP(
        "nmap-mcp",
        version=VERSION,
        instructions=INSTRUCTIONS,
        auth=auth,
        lifespan=lifespan,
        middleware=[LogContext(identify),
                    AuditMiddleware(runtime.auditor, identify),
                    ToolScopeMiddleware(runtime.service.policy.may, identify)],
        mask_error_details=True,
        strict_input_validation=True,
    )
    schemas = register_tools(mcp, runtime.service, settings, identify, runtime.schedules)
    desk = ApprovalDesk(runtime.stores.approvals, runtime.service.policy)
    register_engagement_tools(mcp, schemas, EngagementBook(runtime.stores.engagements, runtime.service.policy),
                              desk, identify)
    register_resources(mcp, runtime.service, identify, privileged=settings.privileged,
                       categories=tuple(settings.script_categories))
    runtime.metrics.known_tools(schemas)
    mcp.add_middleware(ToolErrorMiddleware(schemas))
    mcp.add_middleware(PromptArgumentCheck())
    tune_low_level_server(mcp, schemas)
    if not stdio:
        register_dashboard(mcp, Dashboard(runtime.service, runtime.schedules, desk, runtime.auditor), identify,
                           settings.oauth.base_url if settings.oauth else None)
    if isinstance(auth, MultiAuth) and isinstance(auth.server, OAuthProxy) and settings.oauth is not None:
        UiSignIn(auth.server, settings.oauth, settings.oauth.base_url.rstrip("/") + settings.path).register(mcp)
    mcp.add_extension(ScanTasks(runtime.service, identify, runtime.auditor))

    mcp.custom_route("/healthz", methods=["GET"])(health_endpoint(runtime))
    return mcp, runtime


def health_endpoint(runtime: Runtime) -> Callable[[Request], Awaitable[JSONResponse]]:
    """GET /healthz: 200 when scans can be queued, run and audited, else 503 with the reason.

    Cheap enough to be polled: the disks are asked with statvfs (disk_space), and a byte is
    written only to retry an audit log that could not be written, at most every few seconds
    (AuditLog.problem). With audit_fail_open an audit log that cannot be written leaves it 200,
    with a warning: scans still run."""

    async def healthz(_request: Request) -> JSONResponse:
        audit_problem, warning = runtime.auditor.health()
        problem = await runtime.service.health() or audit_problem
        if problem is not None:
            return JSONResponse({"status": "unavailable", "reason": problem, "version": VERSION}, status_code=503)
        return JSONResponse({"status": "ok", "version": VERSION} | ({"warning": warning} if warning else {}))

    return healthz


def tune_low_level_server(mcp: FastMCP, schemas: dict[str, dict[str, Any]]) -> None:
    """What FastMCP 4.1.2 does not expose of the MCP SDK's server, set on it directly.

    - For every 2026-07-28 tools/call, mcp 2.3.0 checks Mcp-Param headers against the tool's
      input schema, which it gets by running the whole tools/list (71% of the server's time on
      status polls, measured with py-spy) unless the server can look it up: the schemas built
      at start-up answer it.
    - serverInfo's title and description, shown by clients that list their servers.
    """
    low_level = mcp._mcp_server
    low_level.get_tool_input_schema = schemas.get
    low_level.title = "nmap scanner"
    low_level.description = "nmap port scans, an inventory across scans, schedules and scanner pools"


def create_app(mcp: FastMCP, settings: Settings, runtime: Runtime) -> ASGIApp:
    """The Streamable HTTP app: stateless, SSE-capable, Host/Origin protected (browser
    origins allowed for CORS are allowed by the Origin check too), inside http_edge; and
    /metrics beside it, outside the edge with a Host/Origin check of its own (metrics.py
    says why)."""
    app = mcp.http_app(
        path=settings.path,
        stateless_http=True,
        json_response=False,
        host_origin_protection=True,
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=[*settings.allowed_origins, *settings.cors_origins],
        middleware=[Middleware(JsonRpcBodyCheck, mcp_path=settings.path)],
    )
    edge = edge_app(SessionCookieBearer(app), mcp_path=settings.path, allow_query_token=settings.allow_query_token,
                    cors_origins=settings.cors_origins, throttle=runtime.throttle,
                    on_refused=runtime.metrics.refused_token, oauth_routes=oauth_routes(mcp, settings))
    return MetricsEndpoint(edge, runtime.metrics, runtime.stores.workers, settings, runtime.throttle)


def oauth_routes(mcp: FastMCP, settings: Settings) -> list[str] | None:
    """The paths of the OAuth routes people sign in through, when they do (oauth.py)."""
    if settings.oauth is None or mcp.auth is None:
        return None
    return [getattr(route, "path", "") for route in mcp.auth.get_routes(settings.path)]


class GracefulServer(uvicorn.Server):
    """uvicorn, with the runtime drained before it waits for open requests (so that calls
    still waiting on a scan answer), the banner printed once the port is bound, and an exit
    when a background loop of the runtime dies."""

    def __init__(self, config: uvicorn.Config, runtime: Runtime, banner_text: str) -> None:
        super().__init__(config)
        self._runtime = runtime
        self._banner = banner_text
        self._watch: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._watch = asyncio.create_task(self._exit_when_a_loop_dies(), name="loop-watch")
            print(self._banner, flush=True)

    async def _exit_when_a_loop_dies(self) -> None:
        await self._runtime.supervisor.failed.wait()
        self.should_exit = True

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self._runtime.drain()
        # The waiting calls have their answers now; SSE streams may close.
        AppStatus.should_exit = True
        await super().shutdown(sockets)


def find_nmap(configured: str) -> str:
    """Absolute path of the nmap binary; ConfigError when it is missing."""
    found = shutil.which(configured)
    if found is None:
        raise ConfigError(f"nmap not found at '{configured}': install it (apt-get install nmap) or set nmap_path")
    return found


def check_sandbox(settings: Settings, nmap_path: str) -> Sandbox:
    """nmap's sandbox, once nmap has started in it; ConfigError when its commands or its user
    are missing, or nmap does not start as that user."""
    try:
        sandbox = confinement(settings.nmap_user, privileged=settings.privileged, nmap_path=nmap_path)
        check_runs(sandbox, nmap_path)
    except SandboxUnavailable as e:
        raise ConfigError(str(e)) from e
    return sandbox


def endpoint_url(settings: Settings) -> str:
    """The URL clients reach: with sign-in, the public one that the tokens are bound to."""
    if settings.oauth is not None:
        return settings.oauth.base_url.rstrip("/") + settings.path
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}{settings.path}"


def shown_secret(settings: Settings, *, show_token: bool) -> str:
    """The first token's secret when asked for and the config holds it (a plain `secret`), else
    the placeholder clients' docs show."""
    named = settings.named_tokens()
    secret = named[min(named)].secret
    return secret.get_secret_value() if show_token and secret is not None else TOKEN_PLACEHOLDER


def unshowable(settings: Settings) -> str:
    """Why --show-token shows TOKEN_PLACEHOLDER all the same: the first token is kept as a digest."""
    return (f"--show-token cannot show the secret of token '{min(settings.named_tokens())}': the config keeps "
            "only its SHA-256 (secret_sha256). It was shown once, where it was made: by --init, by "
            f"--hash-token --new, or in the {INITIAL_TOKEN_FILE} file of the server's first start")


def program_argv(*, short: bool = False) -> list[str]:
    """The argv that starts this program again from any directory: the interpreter running now
    with server.py, or the installed command, by absolute path, for a GUI app has neither our
    working directory nor our PATH. `sys.executable` and never `python3`: a venv's python is a
    symlink to the system's, which does not have the packages. `short`: the installed command
    by its bare name when PATH finds this very one, for a person at a terminal."""
    program = Path(sys.argv[0])
    if program.suffix == ".py":
        return [sys.executable, str(program.absolute())]
    found = shutil.which(program.name)
    if short and found is not None and Path(found).resolve() == program.resolve():
        return [program.name]
    return [str(program.absolute())]


def stdio_command(config_path: Path) -> list[str]:
    """The argv with which a local client starts this server over stdio."""
    return [*program_argv(), "--stdio", "-c", str(config_path.resolve())]


def stdio_note(settings: Settings, config_path: Path) -> str:
    """What the printed `nmap-local` entries start: which config and database, and whose scans."""
    return (f"{LOCAL_SERVER_NAME}: starts --stdio with {config_path.resolve()}, on the database "
            f"{shown_url(settings.effective_database_url())}; it runs only the scans of its caller "
            f"'{settings.stdio_caller}', never another token's")


def banner(settings: Settings, *, show_token: bool, config_path: Path) -> str:
    """Where the server listens and how to connect each client."""
    names = sorted(settings.named_tokens())
    url = endpoint_url(settings)
    first = names[0]
    secret = shown_secret(settings, show_token=show_token)
    lines = [
        f"nmap-mcp {VERSION} listening on {settings.host}:{settings.port}, endpoint {url}",
        f"tokens: {', '.join(names)} (in {config_path}; --show-token prints a secret the config holds plainly)",
        *expiry_notes(settings.api_keys(), datetime.now(UTC)),
    ]
    if settings.oauth is not None:
        lines.append(f"people sign in with {settings.oauth.issuer} (roles: {', '.join(settings.roles)}); below, "
                     "ChatGPT and Claude Desktop sign in through the browser, the others use an API key")
    if (initial := config_path.with_name(INITIAL_TOKEN_FILE)).exists():
        lines.append(f"{initial} holds the secret of token '{DEFAULT_TOKEN_NAME}' from the first start: copy it "
                     "into your clients, then delete that file")
    if secret == TOKEN_PLACEHOLDER:
        lines += [unshowable(settings)] if show_token else []
        lines.append(f"below, replace {TOKEN_PLACEHOLDER} with the secret of token '{first}'")
    if settings.host in ("0.0.0.0", "::"):
        lines.append("listening on all interfaces: replace 127.0.0.1 below with this machine's address")
    lines.append(f"one client's config alone: {rerun_command(config_path)} --print-config CLIENT "
                 f"(CLIENT: {', '.join(CLIENTS)})")
    lines.append(stdio_note(settings, config_path))
    return "\n".join(lines) + "\n\n" + render_client_configs(url, secret, stdio_command(config_path),
                                                              sign_in=settings.oauth is not None) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=Path(sys.argv[0]).name, description="nmap-mcp: nmap as an MCP server")
    parser.add_argument("--version", action="version", version=f"nmap-mcp {VERSION}")
    parser.add_argument("-c", "--config", type=Path, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    parser.add_argument("--init", action="store_true", help="write a config with a fresh token and exit")
    parser.add_argument("--force", action="store_true", help="with --init: overwrite an existing config")
    parser.add_argument("--show-token", action="store_true",
                        help="print the first token's secret in the banner and --print-config, when the config "
                             "holds it plainly (a secret_sha256 cannot be shown)")
    parser.add_argument("--hash-token", action="store_true",
                        help='print the "secret_sha256" line that stands for a secret read from stdin in a token\'s '
                             "entry of the config, and exit")
    parser.add_argument("--new", action="store_true",
                        help="with --hash-token: make a fresh secret and print it, this once, with its line")
    parser.add_argument("--verify-audit", action="store_true",
                        help="check the hash chain of the config's audit log, print its length and last hash, "
                             "and exit 1 if a line was edited or removed")
    evidence = parser.add_argument_group("evidence", "an archive of tasks' evidence a report can cite")
    evidence.add_argument("--export-evidence", metavar="OUT.tar.gz", type=Path,
                          help="write the evidence of the tasks chosen by --task, --owner, --engagement, --since and "
                               "--until (all that are given must hold) to a new archive, and exit")
    evidence.add_argument("--task", metavar="ID", action="append", default=[], help="this task (repeatable)")
    evidence.add_argument("--owner", metavar="NAME", help="the tasks of this token or person")
    evidence.add_argument("--engagement", metavar="NAME",
                          help="the tasks of this engagement (the archive holds its rules too)")
    evidence.add_argument("--since", metavar="ISO", type=moment, help="tasks created at or after (UTC unless given)")
    evidence.add_argument("--until", metavar="ISO", type=moment, help="tasks created before (UTC unless given)")
    evidence.add_argument("--verify-evidence", metavar="ARCHIVE", type=Path,
                          help="check an archive --export-evidence wrote and exit 1 naming what differs")
    parser.add_argument("--print-config", metavar="CLIENT", choices=CLIENTS,
                        help=f"print one MCP client's configuration and exit: {', '.join(CLIENTS)}; with "
                             "--stdio only the entry that starts nmap-mcp over stdio (where no server runs)")
    roles = parser.add_mutually_exclusive_group()
    roles.add_argument("--stdio", action="store_true",
                       help="serve MCP over stdin/stdout for a local client (scans run in this process)")
    roles.add_argument("--api", dest="role", action="store_const", const=Role.API,
                       help="serve MCP only; scans are run by workers started with --worker")
    roles.add_argument("--worker", dest="role", action="store_const", const=Role.WORKER,
                       help="run scans only (no HTTP listener) for the pool named by the config's `pool`")
    parser.set_defaults(role=Role.ALL)
    args = parser.parse_args(argv)
    if args.new and not args.hash_token:
        parser.error("--new goes with --hash-token")
    chosen = (args.task, args.owner, args.engagement, args.since, args.until)
    if any(value is not None and value != [] for value in chosen) and not args.export_evidence:
        parser.error("--task, --owner, --engagement, --since and --until go with --export-evidence")
    return args


def moment(text: str) -> float:
    """An ISO 8601 date or time as Unix seconds (UTC when it names no offset), for argparse."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time (2026-12-01, "
                                         "2026-12-01T08:00:00Z)") from e
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


def main(argv: list[str] | None = None) -> int:
    """The command line. Notices go to stderr: stdout carries only what was asked for (the
    banner, a client config, a new secret and its config line, or over --stdio the MCP stream
    itself)."""
    args = parse_args(argv)
    config_path: Path = args.config or DEFAULT_CONFIG_PATH
    if args.hash_token:
        return hash_token(new=args.new)
    if args.verify_evidence:
        return verify_evidence(args.verify_evidence)
    try:
        if args.init:
            return init(config_path, force=args.force)
        if args.config is None and not config_path.exists():
            token_file = write_first_config(config_path)
            print(f"no config found: wrote {config_path.resolve()} with a new token '{DEFAULT_TOKEN_NAME}', whose "
                  f"secret is in {token_file.resolve()} (mode 0600) and nowhere else: copy it into your clients, "
                  "then delete that file", file=sys.stderr)
        settings = load_settings(config_path)
        if args.verify_audit:
            return verify_audit(Path(settings.audit_log))
        if args.export_evidence:
            return export_evidence_of(settings, args)
        if args.print_config:
            return print_config(args, settings, config_path)
        nmap_path = find_nmap(settings.nmap_path)
        check_privileges(settings, nmap_path)
        sandbox = check_sandbox(settings, nmap_path)
    except ConfigMissing as e:
        print(f"error: {e}; create one with: {rerun_command(config_path)} --init", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    logger.info("%s", sandbox.describe())
    if args.role is Role.WORKER:
        return asyncio.run(run_worker(settings, nmap_path))
    if args.stdio:
        return asyncio.run(serve_stdio(settings, nmap_path))
    return serve(settings, nmap_path, args, config_path)


def init(config_path: Path, *, force: bool) -> int:
    """`--init`: write a config with a fresh token, and print its secret, the one time it exists
    outside the clients (the config keeps only its SHA-256), with every client's configuration."""
    secret = write_new_config(config_path, force=force)
    print(f"the secret of token '{DEFAULT_TOKEN_NAME}', shown this once: {config_path.resolve()} keeps only its "
          f"SHA-256 (the secret_sha256 line)\nsecret: {secret}\n{config_line(secret)}\n", flush=True)
    settings = load_settings(config_path)
    print(render_client_configs(endpoint_url(settings), secret, stdio_command(config_path)))
    print(f"wrote {config_path.resolve()} with a new token; edit it, then run: {rerun_command(config_path)}",
          file=sys.stderr)
    return 0


def verify_audit(path: Path) -> int:
    """`--verify-audit`: the audit log's hash chain checked (audit.verify_chain); the count and
    the last line's hash on stdout, every break on stderr."""
    try:
        count, last, problems = verify_chain(path)
    except OSError as e:
        print(f"error: cannot read the audit log {path}: {e.strerror}", file=sys.stderr)
        return 2
    return reported(path, problems, f"{count} lines, {{}}; last line's SHA-256 {last}", "break", "chain intact")


def reported(path: Path, problems: list[str], summary: str, flaw: str, intact: str) -> int:
    """A check's findings: each problem on stderr, then `summary` with its verdict on stdout;
    the exit code, 1 when a problem was found."""
    for problem in problems:
        print(f"{path}: {problem}", file=sys.stderr)
    print(f"{path}: " + summary.format(f"{len(problems)} {flaw}{'s' * (len(problems) != 1)}" if problems else intact))
    return 1 if problems else 0


def export_evidence_of(settings: Settings, args: argparse.Namespace) -> int:
    """`--export-evidence OUT`: the archive of the chosen tasks (evidence.py), read from the
    config's database and audit log; its size and SHA-256 on stdout."""
    chosen = EvidenceFilter(tuple(args.task), args.owner, args.since, args.until, args.engagement)
    out: Path = args.export_evidence
    if out.exists():  # said before any work; the archive's O_EXCL open is the guarantee
        print(f"error: {out} exists: the export writes a new file; name another", file=sys.stderr)
        return 2
    try:
        with opened_evidence(settings.effective_database_url(), settings.database_timeout_seconds) as store:
            exported = asyncio.run(export_evidence(store, Path(settings.audit_log), chosen, out,
                                                   server_version=VERSION, now=time.time()))
    except (NothingMatches, NoDatabase) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DatabaseUnavailable:
        print("error: the task database cannot be read: is it reachable, and has a server of this version started "
              "on it once (to bring its schema up to date)?", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: cannot read the audit log {settings.audit_log} or write {out}: {e.strerror}", file=sys.stderr)
        return 2
    for task_id in exported.missing:
        print(f"warning: no task {task_id} meets the other conditions: it is not in the archive", file=sys.stderr)
    for run in exported.altered:
        print(f"warning: the XML of run {run} is not what its worker recorded (raw_xml_sha256): exported as "
              "stored; --verify-evidence names it", file=sys.stderr)
    print(f"{out}: {exported.tasks} task{'s' * (exported.tasks != 1)}, {exported.files} files; "
          f"SHA-256 {exported.sha256}")
    return 0


def verify_evidence(path: Path) -> int:
    """`--verify-evidence ARCHIVE`: every difference on stderr, the verdict on stdout."""
    try:
        files, problems = verify_archive(path)
    except UnreadableArchive as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return reported(path, problems, f"{files} files, {{}}", "difference", "intact")


def hash_token(*, new: bool) -> int:
    """`--hash-token`: the config line for a secret read from stdin; with `--new`, a fresh secret
    and its line, the secret shown this once. The config holds the line in place of the secret."""
    if new:
        secret = new_secret()
        print(f"secret: {secret}\n{config_line(secret)}")
        print("the secret is shown this once: give it to the token's holder, and put the line in the token's "
              "entry under `tokens`", file=sys.stderr)
        return 0
    secret = sys.stdin.readline().rstrip("\r\n") if not sys.stdin.isatty() else getpass.getpass("secret: ")
    if len(secret) < MIN_SECRET_LENGTH or secret_sha256(secret) in PLACEHOLDER_DIGESTS:
        print(f"error: a secret needs at least {MIN_SECRET_LENGTH} characters and must not be a placeholder of "
              "config.example.json; --hash-token --new makes a fresh one", file=sys.stderr)
        return 2
    print(config_line(secret))
    print("put the line in the token's entry under `tokens`, in place of its `secret`", file=sys.stderr)
    return 0


def print_config(args: argparse.Namespace, settings: Settings, config_path: Path) -> int:
    """`--print-config CLIENT` (with `--stdio`: the stdio entry alone, for a machine where no
    server runs): the paste on stdout, what its stdio entry starts on stderr."""
    try:
        paste = render_client_config(args.print_config, url=endpoint_url(settings),
                                     secret=shown_secret(settings, show_token=args.show_token),
                                     stdio_command=stdio_command(config_path), local_only=args.stdio,
                                     sign_in=settings.oauth is not None)
    except UnknownClient as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(paste)
    if args.show_token and TOKEN_PLACEHOLDER in paste:
        print(unshowable(settings), file=sys.stderr)
    if args.print_config in LOCAL_CLIENTS:
        print(stdio_note(settings, config_path), file=sys.stderr)
    return 0


def serve(settings: Settings, nmap_path: str, args: argparse.Namespace, config_path: Path) -> int:
    """Bind the port (a busy port is one clear line), then serve until SIGTERM or SIGINT."""
    try:
        listener = bind(settings.host, settings.port)
    except OSError as e:
        print(f"error: cannot listen on {settings.host}:{settings.port}: {e.strerror}; stop what uses it "
              f"or set another `port` in {config_path}", file=sys.stderr)
        return 2
    mcp, runtime = create_server(settings, nmap_path, role=args.role)
    # sse-starlette cuts every SSE response the moment SIGTERM arrives; calls still waiting on
    # a scan must answer first (GracefulServer.shutdown lets the streams close afterwards).
    AppStatus.disable_automatic_graceful_drain()  # type: ignore[no-untyped-call]
    config = uvicorn.Config(create_app(mcp, settings, runtime), log_config=None, lifespan="on")
    text = banner(settings, show_token=args.show_token, config_path=config_path.resolve())
    GracefulServer(config, runtime, text).run(sockets=[listener])
    return exit_code(runtime)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, made here so that a busy port is reported before start."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose proto says
    # TCP, and accepted sockets inherit proto 0 otherwise; with Nagle on, a response's second
    # write waited for the client's delayed ACK, 40 ms on every request of a kept-alive connection.
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    listener.set_inheritable(True)
    return listener


async def serve_stdio(settings: Settings, nmap_path: str) -> int:
    """`--stdio`: MCP over stdin/stdout until the client closes it, or SIGTERM or SIGINT.
    Scans run in this process; the database keeps them for the client's next start."""
    mcp, runtime = create_server(settings, nmap_path, role=Role.STDIO)
    session = asyncio.ensure_future(mcp.run_stdio_async(show_banner=False))
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, session.cancel)
    failed = asyncio.ensure_future(runtime.supervisor.failed.wait())
    failed.add_done_callback(lambda _: session.cancel())
    with contextlib.suppress(asyncio.CancelledError):
        await session
    failed.cancel()
    return exit_code(runtime)


async def run_worker(settings: Settings, nmap_path: str) -> int:
    """`--worker`: claim and run scans of the configured pool until SIGTERM or SIGINT; with
    `metrics_port`, serve /metrics and /healthz there meanwhile."""
    try:
        listener = bind(settings.host, settings.metrics_port) if settings.metrics_port else None
    except OSError as e:
        print(f"error: cannot listen on {settings.host}:{settings.metrics_port}: {e.strerror}; stop what uses it "
              "or set another `metrics_port`", file=sys.stderr)
        return 2
    runtime = Runtime(settings, nmap_path, Role.WORKER)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with runtime.running(), metrics_listener(listener, runtime.metrics, runtime.stores.workers, settings,
                                                   health_endpoint(runtime), runtime.throttle):
        assert runtime.worker is not None
        logger.info("worker %s serving pool %r with %d slots", runtime.worker.info.name, settings.pool,
                    settings.max_concurrent_tasks)
        waits = [asyncio.ensure_future(event.wait()) for event in (stop, runtime.supervisor.failed)]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for waiting in waits:
            waiting.cancel()
    return exit_code(runtime)


def exit_code(runtime: Runtime) -> int:
    """0 after a requested stop; 1 when the process stopped because a background loop died."""
    if runtime.supervisor.failure is None:
        return 0
    print(f"error: {runtime.supervisor.failure}; see the log for its traceback", file=sys.stderr)
    return 1


def settle_heap() -> None:
    """Once started, keep the cyclic garbage collector off what lives as long as the process.

    The modules, the app and its settings are a few hundred thousand objects that every
    full collection traversed again; frozen, collections see only what requests and scans
    allocate. With the young generation collected every 700 allocations (Python's default),
    the collector held the GIL in 7% of py-spy's samples under a load of quick scans, and
    bench/quick_scans_200.py ran 10% faster with this (alternated runs); what it frees it
    now frees a little later."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_ALLOCATIONS, *gc.get_threshold()[1:])


def check_privileges(settings: Settings, nmap_path: str) -> None:
    """`privileged: true` needs raw sockets: root, ambient capabilities every nmap inherits (the
    systemd drop-in's), or nmap with the capabilities set."""
    if not settings.privileged or os.geteuid() == 0:
        return
    if has_raw_socket_capabilities(Path("/proc/self/status").read_text()):
        return
    try:
        os.getxattr(nmap_path, "security.capability")
    except OSError as e:
        raise ConfigError(
            "privileged is true but this process is not root and nmap has no raw-socket capabilities: run as "
            f"root, or grant them with: sudo setcap cap_net_raw,cap_net_admin+eip {nmap_path}"
        ) from e


def has_raw_socket_capabilities(status: str) -> bool:
    """Whether a process's /proc/PID/status gives the programs it starts CAP_NET_RAW and
    CAP_NET_ADMIN as ambient capabilities (they survive exec without file capabilities)."""
    ambient = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("CapAmb:")), 0)
    return ambient & RAW_SOCKET_CAPABILITIES == RAW_SOCKET_CAPABILITIES


def rerun_command(config: Path) -> str:
    """The shell command that starts the server with `config` again, from any directory."""
    return shlex.join([*program_argv(short=True), "-c", str(config.absolute())])


if __name__ == "__main__":
    sys.exit(main())
