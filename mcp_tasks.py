"""Native MCP Tasks (the `io.modelcontextprotocol/tasks` extension, SEP-2663) over our own tasks.

A 2026-07-28 client that opts in on a `tools/call` of a scan tool gets an MCP task at once
instead of waiting: the task id is our task_id. `tasks/get`, `tasks/update` and `tasks/cancel`
read and change that task in the database through ScanService, so any API process answers
them, before and after a restart; nothing is kept in memory. Everyone else sees no change.

A scan tool is any tool whose body submits a scan through `ScanService.scan`: the call runs
under `scans.without_waiting()`, and when a task was queued the call answers with it.

Each method stands for the tools whose data it shows or whose act it does (policy.ROUTE_TOOLS):
a token restricted by `tools` is refused a method unless it may use them, and gets no task
handle unless it may read the task through one (it gets the tool's own answer instead). A
`tasks/cancel` is audited as a `cancel_task` call.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Literal

import mcp_types
from fastmcp import Context
from fastmcp.server.dependencies import get_http_request
from fastmcp.server.extensions import (
    MethodBinding,
    ServerExtension,
    ToolCallContinuation,
    ToolCallOutcome,
    read_client_extension_settings,
)
from fastmcp.tools.base import ToolResult
from fastmcp.utilities.tasks import TASKS_EXTENSION_ID
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp.shared.inbound import MCP_NAME_HEADER, decode_header_value
from mcp_types.jsonrpc import HEADER_MISMATCH, MISSING_REQUIRED_CLIENT_CAPABILITY
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ConfigDict, Field, SerializationInfo, SerializerFunctionWrapHandler, model_serializer

from approvals import input_request
from audit import Auditor
from auth import Identify
from db import DatabaseUnavailable
from models import TaskAnswer, TaskState, TaskStatus
from policy import Forbidden
from scans import ScanService, without_waiting
from task_manager import TaskAlreadyFinished, TaskNotFound
from views import held, state

McpTaskStatus = Literal["working", "input_required", "completed", "failed", "cancelled"]
MCP_STATUS: dict[TaskStatus, McpTaskStatus] = {
    # Held for a person's yes: the requester is asked for their reason (tasks/update answers);
    # once they gave it, the task is `working` while an approver decides (`held_state`).
    TaskStatus.AWAITING_APPROVAL: "input_required",
    TaskStatus.QUEUED: "working",
    TaskStatus.RUNNING: "working",
    TaskStatus.COMPLETED: "completed",
    # The extension keeps `failed` for JSON-RPC errors: a scan that failed is a tool call that
    # completed with an answer saying so (status, error, and the hosts it had finished).
    TaskStatus.FAILED: "completed",
    TaskStatus.INTERRUPTED: "completed",
    TaskStatus.CANCELLED: "cancelled",
    TaskStatus.DENIED: "completed",
}
# A poll is one keyed read; scans take seconds to hours, so once a second is plenty.
POLL_INTERVAL_MS = 1000
# One answer for a missing id and for another token's id alike, so neither can be told apart.
NOT_FOUND = "Failed to retrieve task: Task not found"
_TASK_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# The extension's methods exist only in the protocol era that has extensions.
_MODERN = frozenset(MODERN_PROTOCOL_VERSIONS)


class McpTask(BaseModel):
    """The extension's `Task`: what every task answer carries, in its camelCase wire names."""

    task_id: str = Field(serialization_alias="taskId")
    status: McpTaskStatus
    status_message: str | None = Field(default=None, serialization_alias="statusMessage")
    created_at: str = Field(serialization_alias="createdAt")
    last_updated_at: str = Field(serialization_alias="lastUpdatedAt")
    # Required but nullable; null: our tasks are kept until an operator deletes them.
    ttl_ms: int | None = Field(default=None, serialization_alias="ttlMs")
    poll_interval_ms: int = Field(default=POLL_INTERVAL_MS, serialization_alias="pollIntervalMs")

    @model_serializer(mode="wrap")
    def _keep_null_ttl(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> dict[str, Any]:
        # The SDK dumps results with exclude_none, which would drop the required `ttlMs: null`.
        data: dict[str, Any] = handler(self)
        data.setdefault("ttlMs" if info.by_alias else "ttl_ms", self.ttl_ms)
        return data


class CreateTaskResult(McpTask):
    """A `tools/call` answered with a task handle."""

    result_type: Literal["task"] = Field(default="task", serialization_alias="resultType")


class GetTaskResult(McpTask):
    """`tasks/get`: the task, with the tool's result once completed or the error once failed,
    and what it asks of its requester while input_required."""

    result_type: Literal["complete"] = Field(default="complete", serialization_alias="resultType")
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    input_requests: dict[str, Any] | None = Field(default=None, serialization_alias="inputRequests")


class TaskParams(mcp_types.RequestParams):
    """`tasks/get` and `tasks/cancel` name one task."""

    model_config = ConfigDict(populate_by_name=True)

    task_id: str = Field(alias="taskId")


class UpdateTaskParams(TaskParams):
    """`tasks/update` answers a task's input requests (a held scan asks its requester's reason)."""

    input_responses: dict[str, Any] = Field(alias="inputResponses")


# `tasks/update` and `tasks/cancel` answer with an empty acknowledgement.
ACKNOWLEDGED: dict[str, Any] = {"resultType": "complete"}


class ScanTasks(ServerExtension):
    """The tasks extension, answered from the scan task store for the caller `identify` names."""

    identifier = TASKS_EXTENSION_ID

    def __init__(self, service: ScanService, identify: Identify, auditor: Auditor) -> None:
        self._service = service
        self._identify = identify
        self._auditor = auditor

    def methods(self) -> Sequence[MethodBinding]:
        return [
            MethodBinding("tasks/get", TaskParams, self._get, protocol_versions=_MODERN),
            MethodBinding("tasks/update", UpdateTaskParams, self._update, protocol_versions=_MODERN),
            MethodBinding("tasks/cancel", TaskParams, self._cancel, protocol_versions=_MODERN),
        ]

    async def intercept_tool_call(
        self,
        params: mcp_types.CallToolRequestParams,  # noqa: ARG002 - the extension's signature; the tool reads them
        context: Context,
        call_next: ToolCallContinuation,
    ) -> ToolCallOutcome:
        """A scan tool called by a client that opted in answers with the task it queued, when
        the caller's token may read that task through the extension's methods."""
        owner = self._identify()
        if not opted_in(context) or owner is None or not self._service.policy.may(owner, "tasks/handle"):
            return await call_next()
        with without_waiting() as submitted:
            outcome = await call_next()
        if not submitted:
            return outcome
        return CreateTaskResult(**task_fields(state(submitted[-1])))

    async def _get(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> GetTaskResult:
        owner = self._caller(ctx, params.task_id)
        with protocol_errors():
            self._service.policy.require(owner, "tasks/get")
            shown = await self._service.status(owner, params.task_id)
            if MCP_STATUS[shown.status] == "completed":
                # The answer get_task_result gives, as the CallToolResult it arrives in.
                self._service.policy.require(owner, "tasks/get (completed)")
                shown = await self._service.result(owner, params.task_id)
                return GetTaskResult(**task_fields(shown), result=tool_result(shown))
            if shown.status is TaskStatus.AWAITING_APPROVAL:
                return await self._held(owner, shown)
        return GetTaskResult(**task_fields(shown))

    async def _held(self, owner: str, shown: TaskState) -> GetTaskResult:
        """A held scan: input_required with its request until its requester gave a reason,
        then working while an approver decides."""
        hold = await self._service.hold_of(owner, shown.task_id)
        if hold is not None and hold.justification is None:
            asking = held(shown, hold.reasons)
            requests = {key: request.model_dump(by_alias=True, mode="json", exclude_none=True)
                        for key, request in input_request(asking.message or "").items()}
            return GetTaskResult(**task_fields(asking), input_requests=requests)
        waiting = task_fields(shown) | {"status": "working",
                                        "status_message": "waiting for an approver to approve or deny the scan"}
        return GetTaskResult(**waiting)

    async def _update(self, ctx: ServerRequestContext[Any, Any], params: UpdateTaskParams) -> dict[str, Any]:
        # A held scan's requester answers with their reason (or declines, withdrawing it); any
        # other response matches no outstanding request and is ignored.
        owner = self._caller(ctx, params.task_id)
        with protocol_errors():
            self._service.policy.require(owner, "tasks/update")
            await self._service.answer_hold(owner, params.task_id, params.input_responses)
        return ACKNOWLEDGED

    async def _cancel(self, ctx: ServerRequestContext[Any, Any], params: TaskParams) -> dict[str, Any]:
        with self._auditor.call(self._identify(), "cancel_task", {"task_id": params.task_id}, scans=False,
                                via="tasks/cancel"):
            owner = self._caller(ctx, params.task_id)
            with protocol_errors(), contextlib.suppress(TaskAlreadyFinished):
                self._service.policy.require(owner, "tasks/cancel")
                await self._service.cancel(owner, params.task_id)
        return ACKNOWLEDGED

    def _caller(self, ctx: ServerRequestContext[Any, Any], task_id: str) -> str:
        """The owner a `tasks/*` request acts for, after the checks every such request gets."""
        if read_client_extension_settings(ctx, TASKS_EXTENSION_ID) is None:
            raise MCPError(MISSING_REQUIRED_CLIENT_CAPABILITY,
                           f"this request needs the client capability {TASKS_EXTENSION_ID}",
                           data={"requiredCapabilities": {"extensions": {TASKS_EXTENSION_ID: {}}}})
        check_routing_header(task_id)
        owner = self._identify()
        if owner is None or not _TASK_ID.fullmatch(task_id):
            raise MCPError(mcp_types.INVALID_PARAMS, NOT_FOUND)
        return owner


def opted_in(context: Context) -> bool:
    """This `tools/call` is from a 2026-07-28 client that declared the extension on it."""
    request = context.request_context
    return (request is not None and request.protocol_version in _MODERN
            and context.client_extension_settings(TASKS_EXTENSION_ID) is not None)


def check_routing_header(task_id: str) -> None:
    """Over HTTP an `Mcp-Name` header, when sent, must name the task the body names (SEP-2243)."""
    try:
        header = get_http_request().headers.get(MCP_NAME_HEADER)
    except RuntimeError:
        return  # not HTTP: no routing headers
    if header is not None and decode_header_value(header) != task_id:
        raise MCPError(HEADER_MISMATCH, f"{MCP_NAME_HEADER} header does not match the request body's 'taskId'")


@contextlib.contextmanager
def protocol_errors() -> Iterator[None]:
    """The store's errors as the JSON-RPC errors the extension names."""
    try:
        yield
    except TaskNotFound as e:
        raise MCPError(mcp_types.INVALID_PARAMS, NOT_FOUND) from e
    except Forbidden as e:
        raise MCPError(mcp_types.INVALID_REQUEST, f"forbidden: {e}") from e
    except DatabaseUnavailable as e:
        raise MCPError(mcp_types.INTERNAL_ERROR, "the task database is not reachable; retry shortly") from e


def task_fields(shown: TaskState) -> dict[str, Any]:
    """The `Task` fields of one of our tasks."""
    updated = max(t for t in (shown.created_at, shown.started_at, shown.finished_at) if t is not None)
    return {"task_id": shown.task_id, "status": MCP_STATUS[shown.status], "status_message": status_message(shown),
            "created_at": iso(shown.created_at), "last_updated_at": iso(updated)}


def status_message(shown: TaskState) -> str | None:
    """Where the scan is, in words: its queue, nmap's phase and percent, or why it ended."""
    if shown.status is TaskStatus.QUEUED:
        return f"queued: waiting for a worker of pool {shown.pool!r}"
    if shown.status is TaskStatus.AWAITING_APPROVAL:
        return shown.message
    if shown.status is TaskStatus.RUNNING:
        if shown.progress is None:
            return "running: no progress reported by nmap yet"
        left = f", about {shown.progress.remaining_s} s left" if shown.progress.remaining_s is not None else ""
        return f"running: {shown.progress.phase} {shown.progress.percent:.0f}%{left}"
    if shown.status is TaskStatus.COMPLETED:
        return None
    return shown.error or f"the scan {shown.status.value}"


def tool_result(shown: TaskAnswer) -> dict[str, Any]:
    """A structured answer as FastMCP turns a tool's pydantic result into a CallToolResult."""
    converted = ToolResult(structured_content=shown.model_dump(mode="json"))
    result = mcp_types.CallToolResult(content=converted.content, structured_content=converted.structured_content)
    return result.model_dump(by_alias=True, mode="json", exclude_none=True)


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat()
