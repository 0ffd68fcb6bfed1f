"""What the service benchmarks share: configs, throw-away PostgreSQL databases, worker
processes, an MCP session, and CPU time read from /proc.

Every benchmark runs the real `server.py` as separate processes (never in-process), so
that what is measured is what an operator runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx2
import psycopg
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.support import POSTGRES_ADMIN_URL, ROOT, LiveServer, write_config

SECRET = "bench-secret-" + "0" * 32
# The highest value of each per-token limit: a benchmark measures throughput, and the default
# quotas (60 scans a minute, 20 at once, ...) would refuse its scans.
NO_LIMITS = {"scans_per_minute": 100_000, "concurrent_scans": 100_000, "addresses_per_day": 100_000_000,
             "rescans_per_hour": 100_000}
SERVER = (sys.executable, str(ROOT / "server.py"))


@contextlib.contextmanager
def postgres_database(prefix: str = "nmap_mcp_bench") -> Iterator[str]:
    """A fresh database named `prefix`_<random> on the PostgreSQL server of
    NMAP_MCP_TEST_POSTGRES (default: this machine's, trust auth), dropped on the way out
    whatever happened."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def service_config(directory: Path, **overrides: object) -> Path:
    """A config in its own `directory` (database, audit log) with the one bench token, and no
    limits that a benchmark's scans could reach."""
    directory.mkdir(parents=True, exist_ok=True)
    return write_config(directory / "config.json", tokens={"bench": {"secret": SECRET}},
                        audit_log=str(directory / "audit.jsonl"), log_level="WARNING", limits=NO_LIMITS,
                        **overrides)


def start_api(config: Path, *, role: str | None = None) -> LiveServer:
    """`server.py -c CONFIG` (or with `--api`) on the config's port, once /healthz answers."""
    program = (*SERVER, f"--{role}") if role else SERVER
    server = LiveServer(config, config.parent / "server.log", json.loads(config.read_text())["port"], program=program)
    server.start()
    return server


def start_worker(config: Path) -> subprocess.Popen[bytes]:
    """`server.py --worker -c CONFIG`; it has no port, so callers wait for it with list_workers."""
    log = (config.parent / "worker.log").open("ab")
    return subprocess.Popen([*SERVER, "--worker", "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=config.parent)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 20 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@contextlib.asynccontextmanager
async def mcp_session(url: str, event_hooks: dict[str, list[Any]] | None = None,
                      secret: str = SECRET) -> AsyncIterator[Client]:
    """One official MCP SDK client (mode auto: the 2026-07-28 era here) with `secret` (the bench
    token's unless given); `event_hooks` go to its httpx2 client (to see the requests and
    responses on the wire)."""
    http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {secret}"}, timeout=600,
                              event_hooks=event_hooks or {})
    async with http, Client(streamable_http_client(url, http_client=http)) as client:
        yield client


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def queued_argv(audit_log: Path) -> list[str]:
    """The argv of the last scan the server queued, as its audit log recorded it."""
    for line in reversed(audit_log.read_text().splitlines()):
        record = json.loads(line)
        if record["event"] == "queued":
            return record["argv"]
    raise RuntimeError(f"no queued line in {audit_log}")


class Wire:
    """What an SDK session sent and received over HTTP: (request, response body) per call."""

    def __init__(self) -> None:
        self.exchanges: list[tuple[httpx2.Request, bytes]] = []

    async def on_response(self, response: httpx2.Response) -> None:
        await response.aread()
        self.exchanges.append((response.request, response.content))

    def hooks(self) -> dict[str, list[Any]]:
        return {"response": [self.on_response]}

    def tool_call(self, name: str) -> tuple[httpx2.Request, bytes]:
        """The last tools/call of tool `name`."""
        for request, body in reversed(self.exchanges):
            if request.headers.get("mcp-method") == "tools/call" and request.headers.get("mcp-name") == name:
                return request, body
        raise LookupError(f"no tools/call of {name} was seen")


async def capture_tool_call(url: str, name: str, arguments: dict[str, Any]) -> httpx2.Request:
    """The HTTP request the SDK (2026-07-28 era) sends for a tools/call of `name` with
    `arguments`: its second such call, the steady state, to be replayed by wrk or curl."""
    wire = Wire()
    async with mcp_session(url, wire.hooks()) as client:
        for _ in range(2):
            await client.call_tool(name, arguments)
    request, _ = wire.tool_call(name)
    assert request.headers["mcp-protocol-version"] == "2026-07-28", request.headers
    return request
