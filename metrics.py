"""Prometheus metrics: `GET /metrics` in the Prometheus text format, one registry per server.

Counted where it happens, a line or two at each place:
- tool calls by tool and verdict (allowed, refused, error): audit.AuditMiddleware;
- refused tokens (401, or 429 once an address is throttled) of the MCP endpoint, the
  operator page and /metrics: http_edge.EdgeMiddleware and `MetricsEndpoint`;
- scans by kind and the status this process's worker reached, with their duration, and the
  nmap processes running in this process: worker.Worker;
- DatabaseUnavailable by store operation: db.Database.

Queue depth, running scans and live workers per pool are read from the shared database when
scraped (two queries, at most once a second), so every process of a fleet reports the same
values for them.

`MetricsEndpoint` is the outermost ASGI layer, outside http_edge: MCP tokens do not open
/metrics and its own 401s keep their own words. It has the MCP endpoint's Host and Origin
check (FastMCP's own guard, with the same lists), so that a page in a browser cannot read it
through DNS rebinding, and the same throttle of refused tokens. With no `metrics_token` it is
off (404): it names every tool, pool and worker count, and an open page was readable by
anything that reached the port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from typing import TypeVar

import uvicorn
from fastmcp.server.http import HostOriginGuardMiddleware
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.asgi import make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from config import Settings
from db import DatabaseUnavailable
from findings import ScanOutcome
from http_edge import remove_url_secrets, too_many_refused
from models import ScanKind, TaskStatus
from throttle import FailedTokenThrottle, client_address
from worker_store import PoolStatus, WorkerStore

T = TypeVar("T")
Endpoint = Callable[[Request], Awaitable[Response]]

METRICS_PATH = "/metrics"
VERDICTS = ("allowed", "refused", "error")
# Where tokens are refused: the MCP endpoint, the operator page's API, /metrics.
ENDPOINTS = ("mcp", "other", "metrics")
# From a quick scan of one nearby host (about 0.05 s) to the default max_scan_seconds (1 h).
SCAN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600)
# The pool gauges are read from the database at most this often, however often scraped.
POOLS_CACHE_SECONDS = 1.0
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="nmap-mcp metrics"'}
MISSING_METRICS_TOKEN = (
    "no token: /metrics needs 'Authorization: Bearer <metrics_token>', the `metrics_token` value in the "
    "server's config file. The MCP tokens do not open /metrics."
)
METRICS_OFF = (
    "/metrics is off: set `metrics_token` in the server's config (a secret of its own, at least 32 "
    "characters) and scrape it with 'Authorization: Bearer <metrics_token>'."
)
WRONG_METRICS_TOKEN = (
    "the token is not this server's metrics_token: compare it with `metrics_token` in the server's config "
    "file. The MCP tokens do not open /metrics."
)


class Metrics:
    """Every metric of one server, in a registry of its own (in-process tests run many)."""

    def __init__(self) -> None:
        # A `_created` series beside every counter and histogram doubles the page for a value
        # Prometheus does not use; the switch is the library's, for the whole process.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        registry = self.registry
        self._tool_calls = Counter("nmap_mcp_tool_calls", "MCP tools/call requests by tool and verdict",
                                   ["tool", "verdict"], registry=registry)
        self._auth_failures = Counter("nmap_mcp_auth_failures", "Requests refused for a missing or wrong token",
                                      ["endpoint", "reason"], registry=registry)
        self._auth_throttled = Counter("nmap_mcp_auth_throttled",
                                       "Refused tokens answered 429: their address sent too many",
                                       ["endpoint"], registry=registry)
        self._scans = Counter("nmap_mcp_scans", "Scans this process's worker ran, by kind and final status",
                              ["kind", "status"], registry=registry)
        self._scan_seconds = Histogram("nmap_mcp_scan_duration_seconds", "How long scans ran, start to verdict",
                                       ["kind"], buckets=SCAN_BUCKETS, registry=registry)
        self._nmap = Gauge("nmap_mcp_nmap_processes", "nmap processes running in this process", registry=registry)
        self._database_errors = Counter("nmap_mcp_database_errors", "Times the task database was not reachable",
                                        ["operation"], registry=registry)
        self._queued = Gauge("nmap_mcp_queue_depth", "Tasks waiting for a worker, per pool", ["pool"],
                             registry=registry)
        self._running = Gauge("nmap_mcp_running_scans", "Tasks claimed by a worker, per pool", ["pool"],
                              registry=registry)
        self._alive = Gauge("nmap_mcp_workers_alive", "Workers whose heartbeat is recent, per pool", ["pool"],
                            registry=registry)
        self._database_up = Gauge("nmap_mcp_database_up", "1 when the last read of the pool gauges succeeded",
                                  registry=registry)
        for endpoint in ENDPOINTS:
            self._auth_throttled.labels(endpoint)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self._tools: frozenset[str] = frozenset()
        # Every series exists from the start at 0, so that rate() sees its first increment.
        for kind in ScanKind:
            self._scan_seconds.labels(kind.value)
            for status in TaskStatus:
                if status.finished:
                    self._scans.labels(kind.value, status.value)

    def known_tools(self, names: Iterable[str]) -> None:
        """The tools whose calls are counted by name; any other name counts as `unknown`."""
        self._tools = frozenset(names)
        for tool in self._tools:
            for verdict in VERDICTS:
                self._tool_calls.labels(tool, verdict)

    def tool_call(self, tool: str, verdict: str) -> None:
        # A caller chooses the tool name: unbounded names must not become series.
        self._tool_calls.labels(tool if tool in self._tools else "unknown", verdict).inc()

    def refused_token(self, endpoint: str, reason: str, throttled: bool) -> None:
        self._auth_failures.labels(endpoint, reason).inc()
        if throttled:
            self._auth_throttled.labels(endpoint).inc()

    def database_error(self, operation: str) -> None:
        self._database_errors.labels(operation).inc()

    async def timed_scan(self, kind: ScanKind, scan: Awaitable[ScanOutcome]) -> ScanOutcome:
        """Await a scan; count it by kind and the status it ended in, and observe its duration."""
        started = time.monotonic()
        outcome = await scan
        self._scan_seconds.labels(kind.value).observe(time.monotonic() - started)
        self._scans.labels(kind.value, outcome.status.value).inc()
        return outcome

    async def nmap_process(self, run: Awaitable[T]) -> T:
        """Await one run of nmap, counted among the processes running meanwhile."""
        with self._nmap.track_inprogress():
            return await run

    def show_pools(self, statuses: Iterable[PoolStatus], configured: Iterable[str]) -> None:
        """Set the pool gauges: every pool the database knows, and every configured one (at 0)."""
        for gauge in (self._queued, self._running, self._alive):
            gauge.clear()
        for pool in configured:
            for gauge in (self._queued, self._running, self._alive):
                gauge.labels(pool).set(0)
        for status in statuses:
            self._queued.labels(status.pool).set(status.queued)
            self._running.labels(status.pool).set(status.running)
            self._alive.labels(status.pool).set(sum(worker["alive"] for worker in status.workers))
        self._database_up.set(1)

    def pools_unknown(self) -> None:
        """The database did not answer: no pool gauge rather than a stale one."""
        for gauge in (self._queued, self._running, self._alive):
            gauge.clear()
        self._database_up.set(0)


class PoolGauges:
    """The pool gauges, read from the store when scraped, at most once a second."""

    def __init__(self, metrics: Metrics, store: WorkerStore, configured: Iterable[str]) -> None:
        self._metrics = metrics
        self._store = store
        self._configured = sorted(set(configured))
        self._read_at = float("-inf")
        self._lock = asyncio.Lock()

    async def refresh(self) -> None:
        async with self._lock:
            if time.monotonic() - self._read_at < POOLS_CACHE_SECONDS:
                return
            try:
                statuses = await self._store.pools(self._store.lease_seconds)
            except DatabaseUnavailable:
                self._metrics.pools_unknown()
            else:
                self._metrics.show_pools(statuses, self._configured)
            self._read_at = time.monotonic()


class MetricsEndpoint:
    """Pure ASGI, outermost: answers GET /metrics itself, behind the Host and Origin check,
    and passes every other request on."""

    def __init__(self, app: ASGIApp, metrics: Metrics, store: WorkerStore, settings: Settings,
                 throttle: FailedTokenThrottle) -> None:
        self.app = app
        self._metrics = metrics
        self._throttle = throttle
        self._token = settings.metrics_token.get_secret_value().encode() if settings.metrics_token else None
        self._pools = PoolGauges(metrics, store, [settings.pool, *settings.pools])
        self._exposition = make_asgi_app(metrics.registry)
        # The lists FastMCP's guard of the MCP endpoint gets (server.create_app).
        self._guarded = HostOriginGuardMiddleware(
            self._serve, allowed_hosts=settings.allowed_hosts,
            allowed_origins=[*settings.allowed_origins, *settings.cors_origins], mode="strict")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != METRICS_PATH:
            await self.app(scope, receive, send)
            return
        # uvicorn's access log reads this scope: a token put in the URL must not reach it.
        remove_url_secrets(scope)
        await self._guarded(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] != "GET":
            await Response(status_code=405, headers={"Allow": "GET"})(scope, receive, send)
            return
        await self._pools.refresh()
        await self._exposition(scope, receive, send)

    def _refusal(self, scope: Scope) -> Response | None:
        """404 when no metrics token is set; a 401 in plain words (or a 429 for an address
        that sent too many wrong ones) unless the request carries it."""
        if self._token is None:
            return JSONResponse({"error": "not_found", "error_description": METRICS_OFF}, status_code=404)
        sent = bearer_token(scope)
        if sent is None:
            self._metrics.refused_token("metrics", "missing_token", False)
            return JSONResponse({"error": "unauthorized", "error_description": MISSING_METRICS_TOKEN},
                                status_code=401, headers=CHALLENGE)
        if not hmac.compare_digest(sent, self._token):
            wait = self._throttle.refused(client_address(scope))
            self._metrics.refused_token("metrics", "wrong_token", wait is not None)
            if wait is not None:
                return too_many_refused(wait)
            return JSONResponse({"error": "invalid_token", "error_description": WRONG_METRICS_TOKEN},
                                status_code=401, headers=CHALLENGE)
        return None


def bearer_token(scope: Scope) -> bytes | None:
    """The credentials of an `Authorization: Bearer ...` header; None without one."""
    for name, value in scope["headers"]:
        if name.lower() == b"authorization":
            scheme, _, credentials = value.partition(b" ")
            return credentials.strip() if scheme.lower() == b"bearer" else None
    return None


async def _not_found(_request: Request, _exc: Exception) -> Response:
    return JSONResponse({"error": "not_found", "error_description": "this port serves only /metrics and /healthz"},
                        status_code=404)


class _MetricsServer(uvicorn.Server):
    """uvicorn inside a process that handles SIGTERM and SIGINT itself (the worker's loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would replace the worker's handlers and re-raise the signal after serving.
        yield


@contextlib.asynccontextmanager
async def metrics_listener(listener: socket.socket | None, metrics: Metrics, store: WorkerStore,
                           settings: Settings, healthz: Endpoint,
                           throttle: FailedTokenThrottle) -> AsyncIterator[None]:
    """Serve /metrics and /healthz (a worker's container HEALTHCHECK asks it) on `listener`,
    if any, while the block runs; any other path is a 404."""
    if listener is None:
        yield
        return
    app = MetricsEndpoint(Starlette(routes=[Route("/healthz", healthz, methods=["GET"])],
                                    exception_handlers={404: _not_found}), metrics, store, settings, throttle)
    server = _MetricsServer(uvicorn.Config(app, log_config=None, lifespan="off"))
    serving = asyncio.create_task(server.serve(sockets=[listener]), name="metrics-listener")
    try:
        yield
    finally:
        server.should_exit = True
        await serving
