"""Throughput of quick scans: 200 through MCP with N concurrent clients vs `xargs -P N`.

    .venv/bin/python bench/quick_scans_200.py [--scans 200] [--clients 10] [--rounds 3]
                                               [--databases sqlite,postgresql]

Per database one `server.py -c CONFIG` (API and worker in one process, max_concurrent_tasks
= N) on a throw-away SQLite file or PostgreSQL database. Through MCP: N official SDK clients
(2026-07-28 era), each calling quick_scan of 127.0.0.1 with rescan=true until --scans calls
were made, every call waiting for its completed result. The reference: `xargs -P N -n 1`
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from mcp import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, mcp_session, postgres_database, queued_argv, service_config, start_api
from scanner import sandbox_prefix
from tests.support import LiveServer

GOAL = 1.2
TARGET = "127.0.0.1"
QUICK = {"target": TARGET, "rescan": True}


def xargs_run(argv: list[str], scans: int, clients: int) -> dict[str, float]:
    """`scans` runs of argv (its final target appended by xargs), `clients` at a time."""
    started = time.perf_counter()
    subprocess.run(["xargs", "-P", str(clients), "-n", "1", *argv[:-1]], input=(argv[-1] + "\n").encode() * scans,
                   capture_output=True, check=True)
    return {"total": time.perf_counter() - started}


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
    parser.add_argument("--clients", type=int, default=10, help="N: concurrent clients, xargs -P and max_concurrent_tasks")
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
        argvs = {}
        for database, server in servers.items():
            asyncio.run(mcp_run(server, 1, 1))  # a first scan, whose argv the audit log records
            argvs[database] = queued_argv(server.config_path.parent / "audit.jsonl")
        argv = argvs[databases[0]]
        assert all(a == argv for a in argvs.values()), f"the servers built different argvs: {argvs}"
        assert argv[-2:] == ["--", TARGET], argv
        runs: dict[str, Callable[[], dict[str, float]]] = {
            "xargs (sandbox prefix)": lambda: xargs_run([*sandbox_prefix(), *argv], args.scans, args.clients),
            "xargs (bare nmap)": lambda: xargs_run(argv, args.scans, args.clients),
            **{f"MCP, {db}": (lambda s=server: asyncio.run(mcp_run(s, args.scans, args.clients)))
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
    print(f"sandbox prefix (server and reference): {' '.join(sandbox_prefix())}")
    print(f"{args.scans} quick scans of {TARGET}, {args.clients} at a time; medians of {args.rounds} alternated rounds")
    reference = median("xargs (sandbox prefix)", "total")
    for name in runs:
        line = f"{name:24} total {median(name, 'total'):6.2f} s  {args.scans / median(name, 'total'):6.1f} scans/s"
        if name.startswith("MCP"):
            line += (f"  call p50 {median(name, 'latency') * 1000:6.1f} ms  server CPU "
                     f"{median(name, 'server_cpu') * 1000:5.1f} ms/scan  client CPU "
                     f"{median(name, 'client_cpu') * 1000:5.1f} ms/scan")
        print(line)
    for database in servers:
        ratio = median(f"MCP, {database}", "total") / reference
        print(f"ratio MCP ({database}) / xargs with prefix: {ratio:.2f}x (goal <= {GOAL}x): "
              f"{'met' if ratio <= GOAL else 'NOT met'}")


if __name__ == "__main__":
    main()
