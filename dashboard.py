"""The operator page under /ui: a static page over a small JSON API that reads, but for an approver's decision.

The page's own files (dashboard_assets/: HTML, JS, CSS) hold no data and are served to
anyone. Every answer under /ui/api/ needs one of the MCP tokens as a Bearer header; the page
asks for it once, keeps it in sessionStorage and sends it only as that header (never in a
URL or a cookie). Holders of a token named in `ui_admin_tokens` see every token's tasks,
everyone else only their own; each part of the page, and each answer under /ui/api/, needs the
rights of the MCP tools that show the same data (policy.ROUTE_TOOLS names them: list_workers,
list_tasks, get_task_result, diff_scans, list_schedules, find_hosts, list_approvals). It changes
one thing: an approver approves or denies a scan waiting for approval, by the one POST under
/ui/api/, which only the page's own origin may send, and which the audit log records as
decide_approval by the viewer, via /ui.

The overview is a list of sections: each is built by one `Section` here and drawn by the
renderer of the same name in dashboard_assets/dashboard.js, so a new section is one entry in
`Dashboard.sections` and one renderer there. docs/ui.md says more.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastmcp import FastMCP
from pydantic import BaseModel, ConfigDict, SerializeAsAny, StringConstraints, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from approvals import ApprovalDesk, ApprovalInfo, ApprovalList, Decision
from audit import Auditor
from auth import Identify
from errors import CODES, code_of, coded
from models import InventoryPage, ScanDiff, ScheduleInfo, TaskAnswer, TaskState, TaskStatus, WorkerList
from scans import ScanService
from schedules import Schedules

ASSETS = Path(__file__).with_name("dashboard_assets")
# The page at /ui, and its two files at /ui/<name>.
PAGE = ("dashboard.html", "text/html; charset=utf-8")
PAGE_FILES = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
# Scripts and styles only from our own files (none inline), requests only to us, no forms
# submitted by the browser itself (a token typed with scripts off must not land in a URL),
# and no framing.
CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                           "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff",
                    "Referrer-Policy": "no-referrer"}
API_HEADERS = SECURITY_HEADERS | {"Cache-Control": "no-store"}
TASK_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
RECENT_TASKS = 20
ACTIVE_TASKS = 50
COMPARABLE_TASKS = 50
HOSTS_SHOWN = 50
SCHEDULES_SHOWN = 100
# The inventory search's filters (find_hosts' arguments of the same names) and their longest values.
HOST_FILTERS = {"network": 50, "service": 64, "product": 200}
HTTP_STATUS = {"forbidden": 403, "not_found": 404, "not_comparable": 409, "already_decided": 409,
               "unavailable": 503}
# A decision's body is a few hundred bytes; a longer POST is refused unread.
MAX_POSTED_BYTES = 4096
DEFAULT_PORTS = {"http": 80, "https": 443}
CROSS_ORIGIN = ("a decision is sent by the operator page itself: this request's Origin is missing or is not "
                "this server's")


class BadRequest(ValueError):
    """A query parameter is missing or malformed."""


class Viewer(BaseModel):
    """Who looks at the page: a token's name, and whether it sees every token's tasks."""

    name: str
    admin: bool


class OwnedTask(BaseModel):
    """A task's state with the name of the token that started it."""

    owner: str
    task: TaskState


class OwnedResult(BaseModel):
    """A task with its result and the name of the token that started it."""

    owner: str
    task: TaskAnswer


class TaskRows(BaseModel):
    """Tasks, newest first."""

    tasks: list[OwnedTask]


class OwnedSchedule(BaseModel):
    """A schedule with the name of the token that owns it."""

    owner: str
    schedule: ScheduleInfo


class ScheduleRows(BaseModel):
    schedules: list[OwnedSchedule]


class InventoryOwners(BaseModel):
    """Whose inventory the viewer may search: its own, or any token's for an admin."""

    owners: list[str]


class OwnedHosts(BaseModel):
    """A page of one token's inventory."""

    owner: str
    hosts: InventoryPage


class DecisionRequest(BaseModel):
    """What the page POSTs to approve or deny a scan: decide_approval's arguments but the task id."""

    model_config = ConfigDict(extra="forbid")
    decision: Decision
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500)]


class SectionData(BaseModel):
    """One section of the overview: the renderer that draws it, its heading, its data."""

    name: str
    title: str
    data: SerializeAsAny[BaseModel]


class Overview(BaseModel):
    """Everything the page shows at once, refreshed every few seconds."""

    viewer: Viewer
    sections: list[SectionData]


@dataclass(frozen=True)
class Section:
    """How one overview section is built: the name of its renderer in dashboard.js, its
    heading, and what builds its data for a viewer. It is shown to tokens that may use its
    route, `/ui#<name>` in policy.ROUTE_TOOLS."""

    name: str
    title: str
    build: Callable[[Viewer], Awaitable[BaseModel]]

    @property
    def route(self) -> str:
        return f"/ui#{self.name}"


class Dashboard:
    """The page's data for one viewer at a time, composed from ScanService; and an approver's
    decisions, audited."""

    def __init__(self, service: ScanService, schedules: Schedules, desk: ApprovalDesk, auditor: Auditor) -> None:
        self._service = service
        self.policy = service.policy
        self._schedules = schedules
        self._desk = desk
        self._auditor = auditor
        # In page order: what waits for the viewer's decision first.
        self.sections = [
            Section("approvals", "Approvals", self.approvals),
            Section("pools", "Pools and workers", self.pools),
            Section("running", "Running and queued scans", self.running),
            Section("recent", "Recent tasks", self.recent),
            Section("diff", "Compare two tasks", self.comparable),
            Section("schedules", "Schedules", self.schedule_rows),
            Section("inventory", "Inventory search", self.inventory_owners),
        ]

    def viewer(self, name: str) -> Viewer:
        """The viewer holding the token named `name`, or the person of that email."""
        return Viewer(name=name, admin=self.policy.ui_admin(name))

    async def overview(self, viewer: Viewer) -> Overview:
        """Every section the viewer's token may see, built now."""
        built = [SectionData(name=s.name, title=s.title, data=await s.build(viewer))
                 for s in self.sections if self.policy.may(viewer.name, s.route)]
        return Overview(viewer=viewer, sections=built)

    async def pools(self, _viewer: Viewer) -> WorkerList:
        """Every pool with its queue and workers (the same for every viewer)."""
        return await self._service.workers()

    async def running(self, viewer: Viewer) -> TaskRows:
        """The running tasks with their progress, then the queued ones."""
        running = await self._tasks(viewer, TaskStatus.RUNNING, ACTIVE_TASKS)
        queued = await self._tasks(viewer, TaskStatus.QUEUED, ACTIVE_TASKS)
        return TaskRows(tasks=running.tasks + queued.tasks)

    async def recent(self, viewer: Viewer) -> TaskRows:
        """The latest tasks in any state (the page fetches each finished one's ports once)."""
        return await self._tasks(viewer, None, RECENT_TASKS)

    async def comparable(self, viewer: Viewer) -> TaskRows:
        """The completed tasks: what diff_scans can compare."""
        return await self._tasks(viewer, TaskStatus.COMPLETED, COMPARABLE_TASKS)

    async def schedule_rows(self, viewer: Viewer) -> ScheduleRows:
        """The viewer's schedules (every token's for an admin) with their last run and change."""
        if viewer.admin:
            pairs = await self._schedules.list_all_schedules(SCHEDULES_SHOWN)
        else:
            own = await self._schedules.list_schedules(viewer.name, SCHEDULES_SHOWN)
            pairs = [(viewer.name, s) for s in own.schedules]
        return ScheduleRows(schedules=[OwnedSchedule(owner=owner, schedule=schedule) for owner, schedule in pairs])

    async def inventory_owners(self, viewer: Viewer) -> InventoryOwners:
        """The tokens (and people) whose inventory the search section offers."""
        return InventoryOwners(owners=self.policy.owners() if viewer.admin else [viewer.name])

    async def hosts(self, viewer: Viewer, owner: str | None, offset: int, **filters: str | int | None) -> OwnedHosts:
        """A page of hosts of one owner's inventory matching find_hosts' filters."""
        owner = self._owner(viewer, owner)
        page = await self._service.find_hosts(owner, filters, limit=HOSTS_SHOWN, offset=offset)
        return OwnedHosts(owner=owner, hosts=page)

    async def task(self, viewer: Viewer, task_id: str, owner: str | None) -> OwnedResult:
        """One task with its result (open ports per host), or the hosts so far while it runs."""
        owner = self._owner(viewer, owner)
        return OwnedResult(owner=owner, task=await self._service.result(owner, task_id, limit=HOSTS_SHOWN))

    async def diff(self, viewer: Viewer, task_a: str, task_b: str, owner: str | None) -> ScanDiff:
        """What changed from task a to task b, two tasks of one owner."""
        return await self._service.diff(self._owner(viewer, owner), task_a, task_b)

    async def approvals(self, viewer: Viewer) -> ApprovalList:
        """The scans waiting for an approver, oldest first (what list_approvals answers)."""
        return await self._desk.pending(viewer.name)

    async def decide(self, viewer: Viewer, task_id: str, request: DecisionRequest) -> ApprovalInfo:
        """Approve or deny a waiting scan as the viewer."""
        return await self._desk.decide(viewer.name, task_id, request.decision, request.reason)

    def audited(self, name: str, tool: str, arguments: dict[str, Any]) -> AbstractContextManager[None]:
        """Audit what runs in the block as `name`'s call of `tool` via /ui, a refusal in the
        words the tool would give."""
        return self._auditor.call(name, tool, arguments, scans=False, via="/ui", refusal=refusal_words)

    def _owner(self, viewer: Viewer, requested: str | None) -> str:
        """Whose task is asked for: any token's for an admin, else always the viewer's own."""
        return requested if viewer.admin and requested else viewer.name

    async def _tasks(self, viewer: Viewer, status: TaskStatus | None, limit: int) -> TaskRows:
        if viewer.admin:
            pairs = await self._service.list_all_tasks(status, limit)
        else:
            pairs = [(viewer.name, task) for task in (await self._service.list_tasks(viewer.name, status, limit)).tasks]
        return TaskRows(tasks=[OwnedTask(owner=owner, task=task) for owner, task in pairs])


Handler = Callable[[Request, Viewer], Awaitable[BaseModel]]
Endpoint = Callable[[Request], Awaitable[Response]]


def register_dashboard(mcp: FastMCP, dashboard: Dashboard, identify: Identify, public_url: str | None) -> None:
    """Serve the page at /ui, its files at /ui/<name> and its JSON API under /ui/api/.
    `public_url`: where people open the server (oauth.base_url), an origin the page's POSTs
    may come from besides the one each request names (behind a proxy that ends TLS, say)."""
    mcp.custom_route("/ui", methods=["GET"])(static_file(*PAGE))
    for name, media_type in PAGE_FILES.items():
        mcp.custom_route(f"/ui/{name}", methods=["GET"])(static_file(name, media_type))
    api = api_route(mcp, dashboard, identify, public_url)

    @api("/ui/api/overview")
    async def overview(_request: Request, viewer: Viewer) -> Overview:
        return await dashboard.overview(viewer)

    @api("/ui/api/tasks/{task_id}")
    async def task(request: Request, viewer: Viewer) -> OwnedResult:
        return await dashboard.task(viewer, task_id(request.path_params["task_id"]), request.query_params.get("owner"))

    @api("/ui/api/diff")
    async def diff(request: Request, viewer: Viewer) -> ScanDiff:
        task_a, task_b = (task_id(request.query_params.get(key, "")) for key in ("a", "b"))
        return await dashboard.diff(viewer, task_a, task_b, request.query_params.get("owner"))

    @api("/ui/api/hosts")
    async def hosts(request: Request, viewer: Viewer) -> OwnedHosts:
        query = request.query_params
        filters = {key: bounded(query, key, limit) for key, limit in HOST_FILTERS.items()}
        return await dashboard.hosts(viewer, query.get("owner"), whole_number(query, "offset", 0, 1_000_000) or 0,
                                     port=whole_number(query, "port", 1, 65535), **filters)

    @api("/ui/api/approvals/{task_id}", method="POST", audit="decide_approval")
    async def decide(request: Request, viewer: Viewer) -> ApprovalInfo:
        decision = decision_of(await request.json())
        return await dashboard.decide(viewer, task_id(request.path_params["task_id"]), decision)


def static_file(name: str, media_type: str) -> Endpoint:
    """An endpoint answering with one of the page's files (read once, now)."""
    body = (ASSETS / name).read_bytes()

    async def serve(_request: Request) -> Response:
        return Response(body, media_type=media_type, headers=SECURITY_HEADERS | {"Cache-Control": "no-cache"})

    return serve


def api_route(mcp: FastMCP, dashboard: Dashboard, identify: Identify,
              public_url: str | None) -> Callable[..., Callable[[Handler], Handler]]:
    """A decorator registering a handler under a path (GET, or a POST only the page's own origin
    may send), for authenticated viewers whose token may use the path (policy.ROUTE_TOOLS)
    only; the errors a caller can act on become JSON errors with the stable codes of the tools.
    With `audit`, the tool the route stands for, each authenticated request is audited as a
    call of that tool, refusals included (as the audit middleware records a tool's calls)."""

    def register(path: str, method: str = "GET", audit: str | None = None) -> Callable[[Handler], Handler]:
        def wrap(handler: Handler) -> Handler:
            async def endpoint(request: Request) -> Response:
                if method != "GET" and not same_origin(request, public_url):
                    return error_response(403, "forbidden", CROSS_ORIGIN)
                name = identify()
                if name is None:
                    # http_edge gives every 401 the plain words and challenge the MCP endpoint's have.
                    return Response(status_code=401, headers=API_HEADERS)
                try:
                    audited = dashboard.audited(name, audit, await arguments_of(request)) if audit else nullcontext()
                    with audited:
                        dashboard.policy.require(name, path)
                        answer = await handler(request, dashboard.viewer(name))
                except BadRequest as e:
                    return error_response(400, "invalid_argument", str(e))
                except tuple(CODES) as e:
                    code = code_of(e) or "error"
                    return error_response(HTTP_STATUS.get(code, 400), code, str(e))
                return Response(answer.model_dump_json(), media_type="application/json", headers=API_HEADERS)

            mcp.custom_route(path, methods=[method])(endpoint)
            return handler

        return wrap

    return register


def same_origin(request: Request, public_url: str | None) -> bool:
    """Whether a state-changing request comes from the page: its Origin (which browsers send
    with every POST and no page script can set) is the origin the request was sent to, or
    `public_url`'s. A page of another origin never gets here with the viewer's credentials:
    it cannot read the page's token, and the session is SameSite=Strict; this check stands
    even where either would fail (another port of the same host is another origin)."""
    origin = request.headers.get("origin")
    own = {origin_of(str(request.base_url)), *([origin_of(public_url)] if public_url else [])}
    return origin is not None and origin_of(origin) in own - {""}


def origin_of(url: str) -> str:
    """`scheme://host:port` of a URL or an Origin header, the port always written ("" for
    none that parses, such as the Origin `null`)."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        return ""
    if not parts.hostname or port is None:
        return ""
    return f"{parts.scheme.lower()}://{parts.hostname}:{port}"


async def arguments_of(request: Request) -> dict[str, Any]:
    """A POST's path parameters and its body, a JSON object of at most MAX_POSTED_BYTES sent as
    application/json (what the audit records of it); BadRequest otherwise."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise BadRequest("send a JSON object as application/json")
    length = request.headers.get("content-length", "")
    if not length.isdigit() or int(length) > MAX_POSTED_BYTES:
        raise BadRequest(f"send a JSON object of at most {MAX_POSTED_BYTES} bytes, with its Content-Length")
    try:
        body = await request.json()  # kept by the request: the handler reads it again
    except ValueError as e:
        raise BadRequest("send a JSON object as application/json") from e
    if not isinstance(body, dict):
        raise BadRequest("send a JSON object as application/json")
    return {**body, **request.path_params}


def decision_of(body: object) -> DecisionRequest:
    """The decision a POSTed body holds; BadRequest saying what it must be otherwise."""
    try:
        return DecisionRequest.model_validate(body)
    except ValidationError as e:
        raise BadRequest('send {"decision": "approve" or "deny", "reason": "why, 1 to 500 characters"}') from e


def refusal_words(error: Exception) -> str | None:
    """What the audit log says of a refused request: `code: words`, as a tool's refusal."""
    return f"invalid_argument: {error}" if isinstance(error, BadRequest) else coded(error)


def task_id(text: str) -> str:
    """`text` when it is a task id; BadRequest (not echoing it) otherwise."""
    if not TASK_ID.match(text):
        raise BadRequest("a task id is required: the task_id of a scan (8-4-4-4-12 lowercase hex digits)")
    return text


def bounded(query: Mapping[str, str], key: str, limit: int) -> str | None:
    """The query parameter `key` (None when absent or empty); BadRequest when longer than `limit`."""
    value = query.get(key, "").strip()
    if len(value) > limit:
        raise BadRequest(f"{key} takes at most {limit} characters")
    return value or None


def whole_number(query: Mapping[str, str], key: str, low: int, high: int) -> int | None:
    """The query parameter `key` as a whole number from `low` to `high`; None when absent or empty."""
    value = query.get(key, "").strip()
    if not value:
        return None
    if not value.isdigit() or not low <= int(value) <= high:
        raise BadRequest(f"{key} must be a whole number from {low} to {high}")
    return int(value)


def error_response(status: int, code: str, description: str) -> Response:
    """A JSON error in the shape of the 401s: {"error": code, "error_description": words}."""
    body = json.dumps({"error": code, "error_description": description})
    return Response(body, status_code=status, media_type="application/json", headers=API_HEADERS)
