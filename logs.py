"""The service's log lines: human-readable text (the default), or one JSON object per line.

JSON lines carry time, level, logger and message, and, where the service knows them, the
`task_id` of the task a worker runs and the `token` name of the caller whose MCP request is
under way. Both come from context variables: set at the start of a worker's run of a task (a
task of its own, so the value stays within it) and by `LogContext` around every MCP request.
uvicorn's loggers are not configured by the server (log_config=None), so its access lines
reach the same handler and are JSON too; so do FastMCP's, in either format, at the configured
level.

No record holds a secret: URL secrets are removed before the access log sees a request, no
code logs a token, every record's text goes through `redact_url_secrets` (a webhook URL with
`?sig=` in an argument logged at DEBUG, an httpx request line), and the libraries that would
echo what passes through them (QUIET_LOGGERS) log warnings and errors only, whatever the level.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from typing import Any

from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from pythonjsonlogger.json import JsonFormatter

from auth import Identify
from http_edge import redact_url_secrets

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# What a JSON line holds, in this order; the `extra` fields libraries add are left out, as in text.
JSON_FIELDS = ("time", "level", "logger", "message", "task_id", "token", "exc_info", "stack_info")
task_id: ContextVar[str | None] = ContextVar("log_task_id", default=None)
token_name: ContextVar[str | None] = ContextVar("log_token_name", default=None)
# Libraries whose detail carries secrets: sse_starlette logs every event it streams at DEBUG,
# so every answer, schedule_scan's one-time webhook_secret among them; httpx logs each request's
# URL at INFO, and a webhook URL's query often holds the receiver's key; httpcore traces each
# request and answer at DEBUG.
QUIET_LOGGERS = ("sse_starlette", "httpx", "httpcore")


def configure_logging(level: str, log_format: str) -> None:
    """Send every record to stderr, as text or as JSON lines (`log_format`)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(without_url_secrets)
    if log_format == "json":
        handler.setFormatter(JsonLines(["levelname", "name", "message"], timestamp="time",
                                       rename_fields={"levelname": "level", "name": "logger"}))
        handler.addFilter(with_context)
        # Python's warnings go straight to stderr. Every line must be JSON: they come here.
        logging.captureWarnings(True)
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # FastMCP gives its logger a Rich handler of its own at import, at INFO, and stops it
    # propagating: its records come here instead, at the configured level, through the filter.
    fastmcp_logger = logging.getLogger("fastmcp")
    fastmcp_logger.handlers.clear()
    fastmcp_logger.propagate = True
    fastmcp_logger.setLevel(logging.NOTSET)
    logging.basicConfig(level=level, handlers=[handler])
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelNamesMapping()[level]))


def without_url_secrets(record: logging.LogRecord) -> bool:
    """Replace the values of secret-looking URL parameters in the record's text and traceback."""
    message = record.getMessage()
    redacted = redact_url_secrets(message)
    if redacted != message:
        record.msg, record.args = redacted, None
    if record.exc_info:
        # Both formatters print exc_text when exc_info is gone (the JSON one would format exc_info anew).
        record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact_url_secrets(record.exc_text)
    return True


def with_context(record: logging.LogRecord) -> bool:
    """Add the task id and token name known where the record was made (fields only when known)."""
    for field, variable in (("task_id", task_id), ("token", token_name)):
        value = variable.get()
        if value is not None:
            setattr(record, field, value)
    return True


class JsonLines(JsonFormatter):
    """python-json-logger's formatter, keeping the fields of JSON_FIELDS only."""

    def process_log_record(self, log_data: dict[str, Any]) -> dict[str, Any]:
        return {field: log_data[field] for field in JSON_FIELDS if field in log_data}


class LogContext(Middleware):
    """Names the caller's token in every record made while its MCP request is handled."""

    def __init__(self, identify: Identify) -> None:
        self._identify = identify

    async def on_request(self, context: MiddlewareContext[Any], call_next: CallNext[Any, Any]) -> Any:
        reset = token_name.set(self._identify())
        try:
            return await call_next(context)
        finally:
            token_name.reset(reset)
