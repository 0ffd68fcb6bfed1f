"""The audit log: one JSON line per tool call, allowed or refused. Never a token.

Tools add what they decided (canonical argv, resolved targets, task id) with `note()`;
the middleware writes the record when the call ends, whatever the outcome.
"""

from __future__ import annotations

import json
import logging
import time
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mcp.types as mt
from fastmcp.exceptions import ToolError
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.tools.base import ToolResult

from auth import Identify

_details: ContextVar[dict[str, Any] | None] = ContextVar("audit_details", default=None)


def note(**facts: Any) -> None:
    """Attach facts to the audit record of the tool call in progress."""
    details = _details.get()
    if details is not None:
        details.update(facts)


class AuditLog:
    """Appends JSON lines to a file through a private logger (no global logging state)."""

    def __init__(self, path: Path) -> None:
        self._handler = logging.FileHandler(path, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger = logging.Logger("nmap_mcp.audit")  # noqa: LOG001 - private, never global
        self._logger.addHandler(self._handler)

    def write(self, record: dict[str, Any]) -> None:
        self._logger.info(json.dumps(record, separators=(",", ":")))

    def close(self) -> None:
        self._handler.close()


class AuditMiddleware(Middleware):
    """Records every tools/call: who, what, the verdict with its reason, how long."""

    def __init__(self, log: AuditLog, identify: Identify) -> None:
        self._log = log
        self._identify = identify

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        details: dict[str, Any] = {}
        reset = _details.set(details)
        started = time.perf_counter()
        verdict, reason = "allowed", None
        try:
            return await call_next(context)
        except ToolError as e:
            verdict, reason = "refused", str(e)
            raise
        except Exception as e:
            # Argument validation and internal failures; the class name is enough here.
            verdict, reason = "error", type(e).__name__
            raise
        finally:
            _details.reset(reset)
            self._log.write({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "token": self._identify(),
                "tool": context.message.name,
                "argv": details.get("argv"),
                "targets": details.get("targets"),
                "task_id": details.get("task_id"),
                "verdict": verdict,
                "reason": reason,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            })
