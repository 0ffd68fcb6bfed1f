"""The audit log: JSON lines, written ahead, never a token.

For every tools/call three moments are recorded, each as one line with the same `call` id:
`accepted` before the tool runs (who, which tool, its arguments), `queued` the moment a scan
tool's task exists (task id, the canonical argv nmap gets, resolved targets, pool), and `done`
when the call ends (verdict with its reason, duration). A crash or `kill -9` mid-scan thus
never loses the record of a scan that started. A cancel by another route than the tool (MCP
Tasks' `tasks/cancel`) is recorded the same way as the tool it stands for, `cancel_task`, with
`via` naming the route, so that every cancel is found under one name.

Each line is appended with one write(2) on a file opened O_APPEND (mode 0600), so it is in
the kernel's hands before the tool goes on. A line is whole or absent, so that every line a
reader finds is JSON: one the disk cut short (a short write) is cut off at once, and a torn
last line a crash left is cut off before the next line is appended. When a line cannot be
written (full disk, permissions), scan tools refuse with `unavailable: audit log not writable`
unless `audit_fail_open`; that refusal is logged at most once a minute, not once per call, and
/healthz says so (Auditor.health). The first line written again is preceded by a `resumed`
line: since when lines were lost, and how many.

The lines are hash-chained: each carries `prev`, the SHA-256 of the whole line before it (the
first, of nothing: GENESIS), set under the same flock as its append, so processes sharing the
file chain into one sequence. `verify_chain` (`nmap-mcp --verify-audit`) finds a line edited or
removed anywhere before the last: the next line's `prev` no longer matches. Cutting lines off
the end leaves a shorter chain that verifies; the last line's hash, which the check prints, is
what a report cites to pin the log as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mcp.types as mt
from fastmcp.exceptions import ToolError
from fastmcp.server.middleware import CallNext, Middleware, MiddlewareContext
from fastmcp.tools.base import ToolResult
from mcp.shared.exceptions import MCPError

from auth import Identify
from disk_space import disk_problem
from http_edge import redact_url_secrets

logger = logging.getLogger(__name__)
# Tools that start scans: they do not run unaudited unless the operator chose fail-open.
SCAN_TOOLS = frozenset({"quick_scan", "full_scan", "custom_scan", "scan", "schedule_scan"})
ARGUMENTS_LIMIT = 4096
WARN_EVERY_SECONDS = 60.0
# While lines cannot be written, /healthz tries again at most this often.
RETRY_SECONDS = 5.0
# A torn last line is looked for backwards from the file's end, this many bytes at a time.
TAIL_CHUNK = 4096
_current: ContextVar[AuditedCall | None] = ContextVar("audited_call", default=None)
# The `prev` of a chain's first line.
GENESIS = "0" * 64


def queued(**facts: Any) -> None:
    """Record, now, that the tool call in progress created a task (task_id, argv, ...)."""
    call = _current.get()
    if call is not None:
        call.queued(facts)


class AuditLog:
    """Appends JSON lines to a file; `write` says whether the line reached the file whole.

    Every line in the file stays whole JSON, also across a full disk and a crash. An append
    holds an flock on the file (processes sharing it, an API and its workers, take turns), first
    cuts a torn last line off (one a crash left, in any process), and cuts its own line off again
    when the disk filled up midway (a short write). After lines were lost, the first line that
    can be written again is preceded by a `resumed` line: since when, and how many were not.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._lock = threading.Lock()
        # While lines cannot be written: since when, how many were not, and when it was last tried.
        self._failing_since: datetime | None = None
        self._unwritten = 0
        self._tried_at = float("-inf")
        with self._lock:
            if not self._open():
                self._failing_since = datetime.now(UTC)

    def _open(self) -> bool:
        """Open (create, mode 0600) the file if it is not open yet; False if it cannot be."""
        if self._fd is None:
            try:
                # Read as well as append: a torn last line is found by reading the file's end.
                self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
            except OSError as e:
                logger.error("cannot open the audit log %s: %s", self.path, e.strerror)
                return False
        return True

    def write(self, record: dict[str, Any]) -> bool:
        with self._lock:
            if self._append([record]):
                return True
            self._unwritten += 1
            return False

    def problem(self) -> str | None:
        """Why lines cannot be written now, in words that name no path; None when they can.

        Cheap enough for every /healthz poll: a statvfs of the log's directory; and while lines
        could not be written, one more try (the `resumed` line alone) at most every
        RETRY_SECONDS, so that the log is seen writable again without a tool call."""
        if disk := disk_problem(self.path.parent):
            return f"the audit log's disk is {disk}"
        with self._lock:
            if self._failing_since is not None and time.monotonic() - self._tried_at >= RETRY_SECONDS:
                self._append([])
            return None if self._failing_since is None else "the audit log cannot be written"

    def _append(self, records: list[dict[str, Any]]) -> bool:
        """Append `records`, after the `resumed` line when lines were lost; False, and the file
        as it was, when that cannot be done."""
        if self._failing_since is not None:
            self._tried_at = time.monotonic()
            records = [{"time": _now(), "event": "resumed", "call": None, "token": None, "tool": None,
                        "since": _iso(self._failing_since), "unwritten": self._unwritten}, *records]
        if not (self._open() and self._written(records)):
            self._failing_since = self._failing_since or datetime.now(UTC)
            return False
        if self._failing_since is not None:
            logger.warning("the audit log is written again; %d lines since %s were not",
                           self._unwritten, _iso(self._failing_since))
            self._failing_since, self._unwritten = None, 0
        return True

    def _written(self, records: list[dict[str, Any]]) -> bool:
        """One write(2) of `records`' lines, chained to the file's last line, under the file's
        flock, after cutting a torn last line off; a short write (the disk filled up midway) is
        cut off again at once."""
        assert self._fd is not None
        try:
            with _locked(self._fd):
                end = self._whole_end()
                prev = self._last_line_hash(end)
                lines = []
                for record in records:
                    lines.append(_line({**record, "prev": prev}))
                    prev = hashlib.sha256(lines[-1]).hexdigest()
                line = b"".join(lines)
                written = os.write(self._fd, line)
                if written < len(line):
                    os.ftruncate(self._fd, end)
        except OSError:
            return False
        return written == len(line)

    def _whole_end(self) -> int:
        """The file's size once a torn last line (no newline at its end) is cut off."""
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        end = self._after_last_newline(size)
        if end < size:
            os.ftruncate(self._fd, end)
            logger.warning("the audit log %s ended in a torn line: its %d bytes were cut off", self.path, size - end)
        return end

    def _last_line_hash(self, end: int) -> str:
        """The SHA-256 of the whole line that ends at `end` (GENESIS for an empty file)."""
        assert self._fd is not None
        if end == 0:
            return GENESIS
        start = self._after_last_newline(end - 1)  # before the line's own newline
        return hashlib.sha256(os.pread(self._fd, end - start, start)).hexdigest()

    def _after_last_newline(self, before: int) -> int:
        """Where the line after the file's last newline before offset `before` starts (0 when
        there is none), read backwards TAIL_CHUNK bytes at a time."""
        assert self._fd is not None
        end = before
        while end > 0:
            start = max(end - TAIL_CHUNK, 0)
            newline = os.pread(self._fd, end - start, start).rfind(b"\n")
            if newline >= 0:
                return start + newline + 1
            end = start
        return 0

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    """An exclusive flock on the file while the block runs: other processes appending take turns."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def verify_chain(path: Path) -> tuple[int, str, list[str]]:
    """Check the hash chain of the audit log at `path`: how many lines, the hash of the last
    one (GENESIS for an empty log), and every break in words (a line whose `prev` is not the
    hash of the line before it: that line, or one between, was edited or removed). Lines from
    before the chain (no `prev`, written by an older nmap-mcp) are counted, not checked."""
    problems: list[str] = []
    prev, count, chained = GENESIS, 0, False
    with path.open("rb") as log:
        for count, line in enumerate(log, 1):
            try:
                record = json.loads(line)
            except ValueError:
                problems.append(f"line {count} is not JSON")
                record = {}
            stated = record.get("prev") if isinstance(record, dict) else None
            chained = chained or stated is not None
            if chained and stated != prev:
                problems.append(f"line {count}: its prev does not match line {count - 1}: line {count - 1} was "
                                "edited, or lines were removed before it" if count > 1 else
                                "line 1 does not start the chain: lines were removed before it")
            prev = hashlib.sha256(line).hexdigest()
    return count, prev, problems


def _line(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()


def _now() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


class AuditedCall:
    """One tools/call's lines."""

    def __init__(self, log: AuditLog, token: str | None, tool: str, via: str | None = None) -> None:
        self._log = log
        self._base = {"call": uuid.uuid4().hex[:16], "token": token, "tool": tool} | ({"via": via} if via else {})
        self.facts: dict[str, Any] = {}

    def write(self, event: str, **fields: Any) -> bool:
        return self._log.write({"time": _now(), "event": event, **self._base, **fields})

    def queued(self, facts: dict[str, Any]) -> None:
        self.facts.update(facts)
        self.write("queued", **facts)


class Auditor:
    """Writes the three lines of an audited call, tool call or scheduled run alike; refuses
    scans it cannot audit (unless fail-open)."""

    def __init__(self, log: AuditLog, *, on_verdict: Callable[[str, str], None], fail_open: bool = False) -> None:
        self._log = log
        # Told each call's tool and verdict (metrics count them).
        self._on_verdict = on_verdict
        self._fail_open = fail_open
        self._warned_at = float("-inf")

    @contextlib.contextmanager
    def call(self, token: str | None, tool: str, arguments: dict[str, Any] | None, *, scans: bool,
             via: str | None = None, refusal: Callable[[Exception], str | None] | None = None) -> Iterator[None]:
        """Audit what runs in the block; `scans`: it may start a scan; `via`: the route that
        stands for `tool` (policy.ROUTE_TOOLS), when it is not the tool's own call; `refusal`:
        the words, as the tool would give them, of an error of the block that is a refusal (a
        route's own errors are no ToolError), None for a failure."""
        call = AuditedCall(self._log, token, tool, via)
        started = time.perf_counter()
        verdict, reason = "allowed", None
        reset = _current.set(call)
        try:
            if not call.write("accepted", arguments=_bounded(arguments)):
                self._warn_unwritable()
                if scans and not self._fail_open:
                    raise ToolError("unavailable: audit log not writable; the scan was not started")
            yield
        except (ToolError, MCPError) as e:
            # ToolErrorMiddleware (inside the middleware) has turned internal failures into coded
            # errors too; a route's JSON-RPC error (MCPError) is what it refused, in its own words.
            verdict, reason = "error" if str(e).startswith("internal_error:") else "refused", str(e)
            raise
        except Exception as e:
            words = refusal(e) if refusal else None
            verdict, reason = ("refused", words) if words else ("error", type(e).__name__)
            raise
        finally:
            _current.reset(reset)
            self._on_verdict(tool, verdict)
            call.write("done", verdict=verdict, reason=reason, task_id=call.facts.get("task_id"),
                       duration_ms=round((time.perf_counter() - started) * 1000, 2))

    def health(self) -> tuple[str | None, str | None]:
        """What /healthz says of the audit log: why scans are refused, or (with fail-open) what is
        wrong while they run unaudited."""
        problem = self._log.problem()
        if problem is None or not self._fail_open:
            return problem, None
        return None, f"{problem}; scans run unaudited (audit_fail_open)"

    def _warn_unwritable(self) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_SECONDS:
            self._warned_at = now
            action = "scans run unaudited (audit_fail_open)" if self._fail_open else "scan tools refuse"
            logger.error("the audit log cannot be written (disk full or permissions?); %s until it can", action)


class AuditMiddleware(Middleware):
    """Every tools/call, audited by the Auditor as the caller `identify` names."""

    def __init__(self, auditor: Auditor, identify: Identify) -> None:
        self._auditor = auditor
        self._identify = identify

    async def on_call_tool(
        self,
        context: MiddlewareContext[mt.CallToolRequestParams],
        call_next: CallNext[mt.CallToolRequestParams, ToolResult],
    ) -> ToolResult:
        tool = context.message.name
        with self._auditor.call(self._identify(), tool, context.message.arguments, scans=tool in SCAN_TOOLS):
            return await call_next(context)


def _bounded(arguments: dict[str, Any] | None) -> Any:
    """The call's arguments, or a note that they were too long to record whole; either way
    without the values of secret-looking URL parameters (a webhook URL's `?sig=`). The
    redaction stops at a quote, so the JSON text stays JSON."""
    text = redact_url_secrets(json.dumps(arguments or {}, default=str))
    return json.loads(text) if len(text) <= ARGUMENTS_LIMIT else {"truncated": text[:ARGUMENTS_LIMIT]}
