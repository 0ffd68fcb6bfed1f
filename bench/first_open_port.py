"""How soon a polling agent sees the first open port of a scan with a slow tail: this checkout
against a baseline.

    .venv/bin/python bench/first_open_port.py --baseline REV [--tail 400] [--rounds 3]
                                              [--databases sqlite,postgresql]

A listener on 127.52.200.1 and custom_scan `-r -p PORT,31000-... --scan-delay 25ms
--max-retries 0 127.52.200.1-3`: nmap scans the ports in order, finds the listener at once,
then spends --tail x 25 ms on closed ports of the three hosts. While the call waits, a second
session polls get_task_result (view summary) every 0.1 s; the figures are the seconds from
the call to the first answer that lists the port, and to the scan's end. nmap writes a host
to its XML only when its host group is done: here, at the end. Each side is `server.py` (API
and worker in one process) on its own database; rounds alternate the sides.
Targets only 127.52.200.1-3.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ab_compare import checkout, start
from bench.common import ROOT, mcp_session, postgres_database, service_config
from tests.support import Listeners, LiveServer

NETWORK = "127.52.200"


async def first_open_port(url: str, port: int, tail: int) -> tuple[float, float]:
    """Seconds from the call to the first answer listing `port` open, and to the scan's end."""
    command = f"-r -p {port},31000-{31000 + tail - 1} --scan-delay 25ms --max-retries 0 {NETWORK}.1-3"
    async with mcp_session(url) as caller, mcp_session(url) as poller:
        started = time.perf_counter()
        call = asyncio.create_task(caller.call_tool("custom_scan", {"command": command, "timeout": 600}))
        task_id = await running_task(poller)
        seen = None
        while (answer := (await poller.call_tool("get_task_result", {"task_id": task_id})).structured_content)[
                "status"] in ("queued", "running"):
            if seen is None and lists(answer, port):
                seen = time.perf_counter() - started
            await asyncio.sleep(0.1)
        ended = time.perf_counter() - started
        await call
    assert answer["status"] == "completed" and lists(answer, port), answer
    return seen or ended, ended


def lists(answer: dict[str, Any], port: int) -> bool:
    hosts = (answer.get("result") or {}).get("hosts", [])
    return any(h["address"] == f"{NETWORK}.1" and any(p["port"] == port for p in h["ports"]) for h in hosts)


async def running_task(client: Any, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = (await client.call_tool("list_tasks", {"limit": 1})).structured_content["tasks"]
        if listed and listed[0]["status"] in ("queued", "running"):
            return str(listed[0]["task_id"])
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no task was queued within {timeout_s:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare against")
    parser.add_argument("--tail", type=int, default=400, help="closed ports after the open one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {}
    listeners = Listeners()
    port = next(p for p in range(10_000, 11_000) if listeners.open(p, f"{NETWORK}.1"))
    with checkout(args.baseline) as baseline, tempfile.TemporaryDirectory(prefix="bench-first-") as tmp, \
            contextlib.ExitStack() as stack:
        stack.callback(listeners.stop)
        servers: dict[str, LiveServer] = {}
        for database in args.databases.split(","):
            for side, tree in (("baseline", baseline), ("this", ROOT)):
                where: dict[str, Any] = {"database_url": stack.enter_context(postgres_database())} \
                    if database == "postgresql" else {}
                config = service_config(Path(tmp) / f"{database}-{side}", allow_loopback=True, **where)
                servers[f"{database}, {side}"] = server = start(tree, config)
                stack.callback(server.stop)
        for round_no in range(args.rounds):
            names = list(servers) if round_no % 2 == 0 else list(reversed(servers))
            for name in names:
                figures.setdefault(name, []).append(asyncio.run(first_open_port(servers[name].url, port, args.tail)))
                seen, ended = figures[name][-1]
                print(f"round {round_no + 1}: {name:22} port shown at {seen:6.2f} s, scan ended at {ended:6.2f} s",
                      flush=True)
    print(f"\nmedians of {args.rounds} rounds; {args.tail} closed ports after the open one, 25 ms apart")
    for name, runs in figures.items():
        print(f"{name:22} first open port shown at {statistics.median(s for s, _ in runs):6.2f} s"
              f" of {statistics.median(e for _, e in runs):6.2f} s")


if __name__ == "__main__":
    main()
