"""Throughput of quick scans: 200 through MCP with N concurrent clients vs `xargs -P N`.

    .venv/bin/python bench/quick_scans_200.py [--scans 200] [--clients 10] [--rounds 3]
                                               [--databases sqlite,postgresql]

Per database one `server.py -c CONFIG` (API and worker in one process, max_concurrent_tasks
= N) on a throw-away SQLite file or PostgreSQL database. Through MCP, every call a
quick_scan of 127.0.0.1 with rescan=true that waits for its completed result, two ways:
- curl: the HTTP request the official SDK (2026-07-28 era, no session) sends for that call,
  captured on the wire and replayed by `curl --parallel --parallel-max N` --scans times (each
  answer checked). curl is C and costs the machine almost nothing, as xargs does: this is
  the figure the goal is judged on, since on 2 cores every millisecond of client CPU is
  taken from the 10 nmap processes.
- SDK: N official SDK clients in this process, each calling until --scans calls were made;
  their own CPU (about 4-6 ms per call) is printed, and is part of their figure.
The reference: `xargs -P N -n 1`
running the argv the server gave nmap, read from its audit log's `queued` line, behind the
same sandbox prefix the server puts before nmap (setpriv --pdeathsig KILL -- prlimit
--fsize=0 --), nmap's XML read by this script through a pipe as the server reads it. xargs
without the prefix is shown as well, for what the prefix costs. The runs alternate (their
order rotates per round); figures are medians over rounds. Goal: MCP / xargs <= 1.2x per
database. Targets only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx2
from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    capture_tool_call,
    cpu_seconds,
    mcp_session,
    postgres_database,
    queued_argv,
    service_config,
    start_api,
)
from tests.support import LiveServer, own_user_sandbox

GOAL = 1.2
TARGET = "127.0.0.1"
QUICK = {"target": TARGET, "rescan": True}
# What curl sets itself, per connection and request.
CURL_OWN_HEADERS = {"host", "content-length", "connection", "accept-encoding", "user-agent"}


def xargs_run(argv: list[str], scans: int, clients: int) -> dict[str, float]:
    """`scans` runs of argv (its final target appended by xargs), `clients` at a time."""
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", str(clients), "-n", "1", *argv[:-1]], input=(argv[-1] + "\n").encode() * scans,
                   capture_output=True, check=True)
    return {"total": time.perf_counter() - started}


def curl_run(server: LiveServer, request: httpx2.Request, body: Path, scans: int, clients: int) -> dict[str, float]:
    """`scans` replays of the captured request, `clients` at a time over kept-alive connections;
    every answer must be a completed scan."""
    assert server.process is not None
    headers = [arg for name, value in request.headers.items() if name not in CURL_OWN_HEADERS
               for arg in ("-H", f"{name}: {value}")]
    server_cpu, client_cpu = cpu_seconds(server.process.pid), resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # An output file per call: answers of parallel transfers may interleave on one stream.
    outputs = [body.with_name(f"answer-{n}.json") for n in range(scans)]
    subprocess.run(["curl", "--silent", "--show-error", "--no-progress-meter", "--fail", "--parallel",
                    "--parallel-immediate", "--parallel-max", str(clients), *headers, "--data-binary", f"@{body}",
                    *(arg for output in outputs for arg in ("-o", str(output), server.url))], check=True)
    total = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = cpu_seconds(server.process.pid) - server_cpu
    client_cpu = (after.ru_utime + after.ru_stime) - (client_cpu.ru_utime + client_cpu.ru_stime)
    for output in outputs:
        answer = json.loads(output.read_bytes())["result"]
        output.unlink()
        assert not answer["isError"] and answer["structuredContent"]["status"] == "completed", answer
    return {"total": total, "server_cpu": server_cpu / scans, "client_cpu": client_cpu / scans}


async def mcp_run(server: LiveServer, scans: int, clients: int) -> dict[str, float]:
    """`scans` quick_scans by `clients` concurrent sessions; the wall time, latencies and CPU."""
    assert server.process is not None
    latencies: list[float] = []
    left = scans

    async def client_loop(session: Client) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            started = time.perf_counter()
            answer = (await session.call_tool("quick_scan", QUICK)).structured_content
            latencies.append(time.perf_counter() - started)
            assert answer["status"] == "completed", answer

    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(mcp_session(server.url)) for _ in range(clients)]
        # The SDK fetches tools/list once per session after its first tools/call: not in the timing.
        await asyncio.gather(*(session.call_tool("list_tasks", {"limit": 1}) for session in sessions))
        server_cpu, client_cpu = cpu_seconds(server.process.pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(session) for session in sessions))
        total = time.perf_counter() - started
        server_cpu, client_cpu = cpu_seconds(server.process.pid) - server_cpu, time.process_time() - client_cpu
    return {"total": total, "latency": statistics.median(latencies), "server_cpu": server_cpu / scans,
            "client_cpu": client_cpu / scans}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--clients", type=int, default=10,
                        help="N: concurrent clients, xargs -P and max_concurrent_tasks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    args = parser.parse_args()
    databases = args.databases.split(",")
    if not set(databases) <= {"sqlite", "postgresql"}:
        parser.error("--databases takes sqlite and/or postgresql")
    with tempfile.TemporaryDirectory(prefix="bench-quick-") as tmp, contextlib.ExitStack() as stack:
        servers: dict[str, LiveServer] = {}
        for database in databases:
            where = {"database_url": stack.enter_context(postgres_database())} if database == "postgresql" else {}
            config = service_config(Path(tmp) / database, max_concurrent_tasks=args.clients,
                                    max_queued_tasks=max(100, args.clients), **where)
            servers[database] = start_api(config)
            stack.callback(servers[database].stop)
        argvs, requests = {}, {}
        for database, server in servers.items():
            # The audit log records the argv of this call.
            requests[database] = asyncio.run(capture_tool_call(server.url, "quick_scan", QUICK))
            argvs[database] = queued_argv(server.config_path.parent / "audit.jsonl")
            body = Path(tmp) / f"{database}-request.json"
            body.write_bytes(requests[database].content)
        argv = argvs[databases[0]]
        assert all(a == argv for a in argvs.values()), f"the servers built different argvs: {argvs}"
        assert argv[-2:] == ["--", TARGET], argv
        runs: dict[str, Callable[[], dict[str, float]]] = {
            "xargs (sandbox prefix)": lambda: xargs_run([*own_user_sandbox(), *argv], args.scans, args.clients),
            "xargs (bare nmap)": lambda: xargs_run(argv, args.scans, args.clients),
            **{f"MCP curl, {db}": (lambda s=server, db=db: curl_run(s, requests[db], Path(tmp) / f"{db}-request.json",
                                                                     args.scans, args.clients))
               for db, server in servers.items()},
            **{f"MCP SDK, {db}": (lambda s=server: asyncio.run(mcp_run(s, args.scans, args.clients)))
               for db, server in servers.items()},
        }
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        order = list(runs)
        for round_no in range(args.rounds):
            for name in order[round_no % len(order):] + order[:round_no % len(order)]:
                figures[name].append(runs[name]())
                print(f"round {round_no + 1}: {name:24} {figures[name][-1]['total']:6.2f} s", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(f[key] for f in figures[name])

    print(f"\nnmap argv (from the audit log): {' '.join(argv)}")
    print(f"sandbox prefix (server and reference): {' '.join(own_user_sandbox())}")
    print(f"{args.scans} quick scans of {TARGET}, {args.clients} at a time; medians of {args.rounds} alternated rounds")
    reference = median("xargs (sandbox prefix)", "total")
    for name in runs:
        line = f"{name:24} total {median(name, 'total'):6.2f} s  {args.scans / median(name, 'total'):6.1f} scans/s"
        if name.startswith("MCP"):
            line += (f"  server CPU {median(name, 'server_cpu') * 1000:5.1f} ms/scan  client CPU "
                     f"{median(name, 'client_cpu') * 1000:5.2f} ms/scan")
        if name.startswith("MCP SDK"):
            line += f"  call p50 {median(name, 'latency') * 1000:6.1f} ms"
        print(line)
    for client in ("curl", "SDK"):
        for database in servers:
            ratio = median(f"MCP {client}, {database}", "total") / reference
            goal = f" (goal <= {GOAL}x): {'met' if ratio <= GOAL else 'NOT met'}" if client == "curl" else ""
            print(f"ratio MCP {client} ({database}) / xargs with prefix: {ratio:.2f}x{goal}")


if __name__ == "__main__":
    main()
