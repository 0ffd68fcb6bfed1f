"""Same-run A/B: this checkout against an earlier revision, on the hot paths of the service.

    .venv/bin/python bench/ab_compare.py --baseline REV [--rounds 6] [--scans 200] [--clients 10]
                                          [--polls 3000] [--databases sqlite,postgresql]

The revision is checked out into a temporary git worktree; both run as `server.py -c CONFIG`
(API and worker in one process) with the same Python, each on a throw-away SQLite file or
PostgreSQL database of its own. Two workloads, each the HTTP request the official SDK sends
(captured once on the wire), replayed by curl so that the load generator costs the 2 cores
little:
- quick scans: --scans quick_scan calls of 127.0.0.1 (rescan, waiting for the result),
  --clients at a time: submit, claim, nmap, verdict, inventory;
- status polls: --polls get_task_status calls of one completed task, 50 at a time.
Runs alternate A B B A ... so that drift of a noisy machine falls on both; figures are medians
and the ratio is this checkout / the baseline (lower is better). Goal: within 1.03x.
Targets only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, capture_tool_call, cpu_seconds, mcp_session, postgres_database, service_config
from bench.quick_scans_200 import CURL_OWN_HEADERS, QUICK, curl_run
from tests.support import LiveServer

GOAL = 1.03
POLL_CLIENTS = 50


@contextlib.contextmanager
def checkout(revision: str) -> Iterator[Path]:
    """`revision` in a temporary worktree of this repository, removed at the end."""
    with tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), revision],
                       check=True, capture_output=True)
        try:
            yield tree
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=True)


def start(tree: Path, config: Path) -> LiveServer:
    server = LiveServer(config, config.parent / "server.log", json.loads(config.read_text())["port"],
                        program=(sys.executable, str(tree / "server.py")))
    server.start()
    return server


def poll_run(server: LiveServer, request: httpx2.Request, body: Path, polls: int) -> dict[str, float]:
    """`polls` replays of a get_task_status request, POLL_CLIENTS at a time; each must succeed."""
    assert server.process is not None
    headers = [arg for name, value in request.headers.items() if name not in CURL_OWN_HEADERS
               for arg in ("-H", f"{name}: {value}")]
    answers = body.with_name("polls.out")
    server_cpu = cpu_seconds(server.process.pid)
    started = time.perf_counter()
    with answers.open("wb") as out:
        subprocess.run(["curl", "--silent", "--show-error", "--no-progress-meter", "--fail", "--parallel",
                        "--parallel-immediate", "--parallel-max", str(POLL_CLIENTS), *headers,
                        "--data-binary", f"@{body}", *[server.url] * polls], stdout=out, check=True)
    total = time.perf_counter() - started
    server_cpu = cpu_seconds(server.process.pid) - server_cpu
    assert answers.read_bytes().count(b'"isError":false') == polls, "a status poll failed"
    return {"total": total, "server_cpu": server_cpu / polls}


async def completed_task(url: str) -> str:
    async with mcp_session(url) as client:
        answer = (await client.call_tool("quick_scan", {"target": "127.0.0.1"})).structured_content
    assert answer["status"] == "completed", answer
    return str(answer["task_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--polls", type=int, default=3000)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    runs: dict[str, Callable[[], dict[str, float]]] = {}
    with checkout(args.baseline) as baseline, tempfile.TemporaryDirectory(prefix="bench-ab-") as tmp, \
            contextlib.ExitStack() as stack:
        for database in args.databases.split(","):
            for side, tree in (("baseline", baseline), ("this", ROOT)):
                directory = Path(tmp) / f"{database}-{side}"
                where = {"database_url": stack.enter_context(postgres_database())} if database == "postgresql" else {}
                server = start(tree, service_config(directory, max_concurrent_tasks=args.clients,
                                                    max_queued_tasks=max(100, args.clients), **where))
                stack.callback(server.stop)
                scan = asyncio.run(capture_tool_call(server.url, "quick_scan", QUICK))
                (directory / "scan.json").write_bytes(scan.content)
                poll = asyncio.run(capture_tool_call(server.url, "get_task_status",
                                                     {"task_id": asyncio.run(completed_task(server.url))}))
                (directory / "poll.json").write_bytes(poll.content)
                runs[f"quick scans, {database}, {side}"] = (
                    lambda s=server, r=scan, d=directory: curl_run(s, r, d / "scan.json", args.scans, args.clients))
                runs[f"status polls, {database}, {side}"] = (
                    lambda s=server, r=poll, d=directory: poll_run(s, r, d / "poll.json", args.polls))
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
        pairs = [(name, name.replace(", baseline", ", this")) for name in runs if name.endswith(", baseline")]
        for round_no in range(args.rounds):
            for first, second in pairs:
                for name in (first, second) if round_no % 2 == 0 else (second, first):
                    figures[name].append(runs[name]())
                    print(f"round {round_no + 1}: {name:34} {figures[name][-1]['total']:6.2f} s", flush=True)

    def median(name: str, key: str) -> float:
        return statistics.median(f[key] for f in figures[name])

    print(f"\nthis checkout against {args.baseline}; medians of {args.rounds} alternated rounds")
    for baseline_name, this_name in pairs:
        ratio = median(this_name, "total") / median(baseline_name, "total")
        cpu = median(this_name, "server_cpu") / median(baseline_name, "server_cpu")
        workload = baseline_name.removesuffix(", baseline")
        print(f"{workload:26} baseline {median(baseline_name, 'total'):6.2f} s  "
              f"this {median(this_name, 'total'):6.2f} s"
              f"  ratio {ratio:.3f}x (goal <= {GOAL}x: {'met' if ratio <= GOAL else 'NOT met'})"
              f"  server CPU {median(baseline_name, 'server_cpu') * 1000:5.2f} -> "
              f"{median(this_name, 'server_cpu') * 1000:5.2f} ms/call ({cpu:.3f}x)")


if __name__ == "__main__":
    main()
