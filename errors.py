"""The errors callers see: every tool error starts with a stable code, then says in plain
words what to change. Exceptions of the modules below become codes in `tool_errors()`;
arguments that fail schema validation, unknown tools and internal failures are translated
by `ToolErrorMiddleware`, so no caller ever reads library text or an external URL.

Outside tools, a caller's mistake (a prompt argument missing or unknown, a task resource
that is not the caller's) is JSON-RPC -32602, invalid params (`invalid_params`,
`PromptArgumentCheck`), with no traceback in the log: the server did nothing wrong."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import mcp.types as mt
from fastmcp.exceptions import NotFoundError, ToolError
from fastmcp.exceptions import ValidationError as ArgumentsRefused
from fastmcp.prompts import Prompt, PromptResult
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.tools.base import ToolResult
from pydantic import ValidationError

from approval_store import ApprovalDecided, ApprovalNotFound, OwnApproval
from db import DatabaseUnavailable
from engagement_store import EngagementExists, EngagementNotFound
from engagements import EngagementRefused
from inventory import InventoryQueryError
from limits import QueueFull, RateLimited
from nmap_options import CommandError
from nmap_report import clean_text
from policy import Forbidden, NoPool
from scans import NotComparable, ShuttingDown
from schedule_store import ScheduleNotFound, TooManySchedules
from schedules import ScheduleError, ScheduleForbidden
from targets import TargetError
from task_manager import TaskAlreadyFinished, TaskNotFound
from webhooks import WebhookRefused

logger = logging.getLogger(__name__)
CODES: dict[type[Exception], str] = {
    NotComparable: "not_comparable",
    CommandError: "invalid_command",
    TargetError: "invalid_target",
    QueueFull: "queue_full",
    RateLimited: "rate_limited",
    TaskNotFound: "not_found",
    TaskAlreadyFinished: "already_finished",
    DatabaseUnavailable: "unavailable",
    ShuttingDown: "unavailable",
    NoPool: "no_pool",
    Forbidden: "forbidden",
    InventoryQueryError: "invalid_argument",
    ScheduleError: "invalid_schedule",
    ScheduleForbidden: "forbidden",
    ScheduleNotFound: "not_found",
    TooManySchedules: "rate_limited",
    WebhookRefused: "invalid_webhook",
    EngagementNotFound: "not_found",
    EngagementExists: "already_exists",
    ApprovalNotFound: "not_found",
    ApprovalDecided: "already_decided",
    OwnApproval: "forbidden",
    # Its own code: outside_scope, excluded, outside_window, engagement_not_started, ... (engagements.py).
    EngagementRefused: "engagement",
}
# FastMCP logs the traceback of a FastMCPError at the error's own log_level: below DEBUG, the
# lowest level `log_level` allows, it is never written.
UNLOGGED = logging.DEBUG - 5
CODED = re.compile(r"^[a-z][a-z_]*: ")
# What of a caller's own text an error may repeat (an argument's name, a tool's name).
ECHO_LIMIT = 64


@contextlib.contextmanager
def tool_errors() -> Iterator[None]:
    """Turn the errors a caller can act on into ToolErrors with a stable code."""
    try:
        yield
    except tuple(CODES) as e:
        raise ToolError(f"{code_of(e)}: {e}") from e


def invalid_params(message: str) -> ArgumentsRefused:
    """An error FastMCP answers with JSON-RPC -32602 (its ValidationError) and does not log."""
    return ArgumentsRefused(message, log_level=UNLOGGED)


def code_of(error: Exception) -> str | None:
    """The stable code of an error a caller can act on; None for any other error."""
    if isinstance(error, EngagementRefused):
        return error.code
    return next((code for kind, code in CODES.items() if isinstance(error, kind)), None)


def coded(error: Exception) -> str | None:
    """What a tool says of an error a caller can act on, `code: words`; None for any other error."""
    code = code_of(error)
    return None if code is None else f"{code}: {error}"


class ToolErrorMiddleware(Middleware):
    """Arguments refused by a tool's schema, unknown tools and unexpected failures, as coded
    tool errors. `schemas` maps each tool to its input schema, for the bounds it states."""

    def __init__(self, schemas: Mapping[str, dict[str, Any]]) -> None:
        self._schemas = schemas

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        name = context.message.name
        try:
            return await call_next(context)
        except ToolError as e:
            if CODED.match(str(e)):
                raise
            # FastMCP's own mask ("Error calling tool 'x'"); it has logged the traceback.
            raise ToolError("internal_error: the tool failed unexpectedly; the server log has the details") from e
        except ArgumentsRefused as e:
            raise arguments_refused(e, name, self._schemas.get(name, {})) from e
        except NotFoundError as e:
            raise ToolError(f"not_found: there is no tool {_echo(name)!r}; tools/list names them") from e
        except Exception as e:
            logger.exception("tool %s failed", name)
            raise ToolError("internal_error: the tool failed unexpectedly; the server log has the details") from e


def arguments_refused(error: ArgumentsRefused, tool: str, schema: Mapping[str, Any]) -> ToolError:
    """The coded tool error for arguments `tool`'s schema refused."""
    if not isinstance(error.__cause__, ValidationError):
        return ToolError("invalid_argument: the arguments do not fit the tool's input schema")
    return ToolError("invalid_argument: " + describe_invalid_arguments(error.__cause__, tool, schema))


class PromptArgumentCheck(Middleware):
    """prompts/get with a missing or unknown argument is refused with -32602 naming it, before
    FastMCP renders the prompt: it would answer -32603 and log a traceback for a missing one,
    and drop an unknown one without a word."""

    async def on_get_prompt(
        self,
        context: MiddlewareContext[mt.GetPromptRequestParams],
        call_next: CallNext[mt.GetPromptRequestParams, PromptResult],
    ) -> PromptResult:
        server = context.fastmcp_context.fastmcp if context.fastmcp_context else None
        prompt = await server.get_prompt(context.message.name) if server else None
        if prompt is not None:
            problem = describe_prompt_arguments(prompt, context.message.arguments or {})
            if problem is not None:
                raise invalid_params(f"Invalid params: {problem}")
        return await call_next(context)


def describe_prompt_arguments(prompt: Prompt, given: Mapping[str, object]) -> str | None:
    """What is wrong with the arguments `given` to `prompt`, in words; None when nothing is."""
    declared = {argument.name: argument.required for argument in prompt.arguments or ()}
    takes = ", ".join(declared) or "no arguments"
    if unknown := sorted(set(given) - set(declared)):
        return f"prompt {prompt.name} takes {takes}; {_echo(unknown[0])!r} is not one of its arguments"
    if missing := sorted(name for name, required in declared.items() if required and name not in given):
        return f"prompt {prompt.name} needs the argument {missing[0]} (it takes {takes})"
    return None


def describe_invalid_arguments(error: ValidationError, tool: str, schema: Mapping[str, Any]) -> str:
    """One sentence per refused argument, from the tool's schema: never the caller's input."""
    properties: Mapping[str, Any] = schema.get("properties", {})
    sentences = []
    for item in error.errors():
        argument = _echo(str(item["loc"][0])) if item["loc"] else "the arguments"
        if item["type"] in ("missing_argument", "missing"):
            sentences.append(f"{argument} is required")
        elif item["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            sentences.append(f"{argument!r} is not an argument of {tool}; it takes {', '.join(properties)}")
        elif argument in properties:
            sentences.append(f"{argument} must be {expectation(properties[argument])}")
        else:
            sentences.append(f"{argument}: {_echo(item['msg'], 200)}")
    # A value that fits no branch of a union fails each branch: one sentence says it.
    return "; ".join(dict.fromkeys(sentences))


def expectation(prop: Mapping[str, Any]) -> str:
    """What a JSON-schema property accepts, in words: 'a whole number from 5 to 300'."""
    choices = [p for p in prop.get("anyOf", ()) if p.get("type") != "null"]
    if choices:
        return " or ".join(expectation(p) for p in choices) + " (or null)"
    if isinstance(prop.get("type"), list):
        return " or ".join(expectation({**prop, "type": kind}) for kind in prop["type"])
    if "enum" in prop:
        return "one of " + ", ".join(str(v) for v in prop["enum"])
    kind = prop.get("type")
    if kind == "integer":
        return "a whole number" + _range(prop.get("minimum"), prop.get("maximum"))
    if kind == "number":
        return "a number" + _range(prop.get("minimum"), prop.get("maximum"))
    if kind == "boolean":
        return "true or false"
    if kind == "string":
        return "a string" + _length(prop.get("minLength"), prop.get("maxLength")) + (
            f" matching {prop['pattern']}" if "pattern" in prop else "")
    if kind == "array":
        return "a list" + _length(prop.get("minItems"), prop.get("maxItems"), "items")
    return f"of JSON type {kind}" if kind else "of another kind"


def _range(low: object, high: object) -> str:
    if low is not None and high is not None:
        return f" from {low} to {high}"
    return f" of at least {low}" if low is not None else (f" of at most {high}" if high is not None else "")


def _length(low: object, high: object, unit: str = "characters") -> str:
    if low is not None and high is not None:
        return f" of {low} to {high} {unit}"
    return f" of at most {high} {unit}" if high is not None else ""


def _echo(text: str, limit: int = ECHO_LIMIT) -> str:
    return clean_text(text, limit)
