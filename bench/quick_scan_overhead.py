"""What the service adds to a quick scan: quick_scan through MCP vs the same nmap run directly.

    .venv/bin/python bench/quick_scan_overhead.py [--runs 10]

Starts `server.py` on a free loopback port with a throw-away config and database, then
alternates the two measurements so that machine noise hits both alike: one quick_scan of
127.0.0.1 through the official MCP client (one session, Bearer token, rescan=true so that
nmap really runs) and one run of the exact argv the server builds, started directly.
Prints medians and their ratio, plus a status poll and a quick_scan answered from the
freshness window.
Targets only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx2
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models import ScanKind  # noqa: E402
from scanner import build_argv, scan_options  # noqa: E402
from server import find_nmap  # noqa: E402
from tests.support import LiveServer, free_port  # noqa: E402

SECRET = "bench-secret-" + "0" * 32


def start_server(workdir: Path) -> LiveServer:
    config = workdir / "config.json"
    port = free_port()
    config.write_text(json.dumps({
        "host": "127.0.0.1", "port": port, "tokens": {"bench": {"secret": SECRET}},
        "allow_loopback": True, "db_path": str(workdir / "tasks.db"), "log_level": "WARNING",
    }))
    server = LiveServer(config, workdir / "server.log", port)
    server.start()
    return server


def direct_run(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, check=True)
    return time.perf_counter() - started


async def measure(url: str, argv: list[str], runs: int) -> tuple[list[float], ...]:
    through_mcp: list[float] = []
    direct: list[float] = []
    status_polls: list[float] = []
    cached: list[float] = []
    headers = {"Authorization": f"Bearer {SECRET}"}
    async with httpx2.AsyncClient(headers=headers, timeout=60) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
            warm = await client.call_tool("quick_scan", {"target": "127.0.0.1"})
            task_id = warm.structured_content["task_id"]
            for _ in range(runs):
                started = time.perf_counter()
                result = await client.call_tool("quick_scan", {"target": "127.0.0.1", "rescan": True})
                through_mcp.append(time.perf_counter() - started)
                assert result.structured_content["status"] == "completed", result
                direct.append(direct_run(argv))
                started = time.perf_counter()
                await client.call_tool("get_task_status", {"task_id": task_id})
                status_polls.append(time.perf_counter() - started)
                started = time.perf_counter()
                await client.call_tool("quick_scan", {"target": "127.0.0.1"})
                cached.append(time.perf_counter() - started)
    return through_mcp, direct, status_polls, cached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    argv = build_argv(find_nmap("nmap"), scan_options(ScanKind.QUICK, privileged=False), ["127.0.0.1"],
                      ipv6=False, privileged=False)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp))
        try:
            mcp_times, direct_times, polls, cached = asyncio.run(measure(server.url, argv, args.runs))
        finally:
            server.stop()
    mcp_median, direct_median = statistics.median(mcp_times), statistics.median(direct_times)
    print(f"nmap argv: {' '.join(argv)}")
    print(f"runs: {args.runs} each, alternated")
    print(f"quick_scan through MCP   median {mcp_median * 1000:7.1f} ms")
    print(f"same nmap run directly   median {direct_median * 1000:7.1f} ms")
    print(f"service overhead         median {(mcp_median - direct_median) * 1000:7.1f} ms")
    print(f"ratio MCP / direct       {mcp_median / direct_median:7.2f}x")
    print(f"get_task_status poll     median {statistics.median(polls) * 1000:7.1f} ms")
    print(f"quick_scan, fresh result median {statistics.median(cached) * 1000:7.1f} ms (rescan=false, no nmap)")


if __name__ == "__main__":
    main()
