"""How long a small scan waits behind another token's backlog: this checkout against a baseline.

    .venv/bin/python bench/fair_share.py --baseline REV [--backlog 20] [--slots 2] [--rounds 3]
                                         [--databases sqlite,postgresql]

Token `hog` queues --backlog slow but allowed custom scans (100 ports of 127.0.0.1 at a 20 ms
scan delay: about 2 s each), then token `small` calls quick_scan of 127.0.0.1 and waits for
its result; the figure is that call's time, and the hog's backlog is cancelled after it. Each
side is `server.py` (API and worker in one process) with --slots scan slots, on its own
database; rounds alternate the sides. Before fair turns the small scan waits for the whole
backlog (backlog x 2 s / slots); after, for at most the scan in one slot.
Targets only 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ab_compare import checkout, start
from bench.common import NO_LIMITS, ROOT, mcp_session, postgres_database, service_config
from tests.support import LiveServer

SECRETS = {"hog": "hog-secret-" + "1" * 32, "small": "small-secret-" + "2" * 32}
SLOW_SCAN = "-p 1-100 --scan-delay 20ms --max-retries 0 127.0.0.1"


async def small_scan_wait(url: str, count: int) -> float:
    """Seconds a quick_scan of `small` takes behind `count` queued scans of `hog`."""
    async with mcp_session(url, secret=SECRETS["hog"]) as hog, mcp_session(url, secret=SECRETS["small"]) as small:
        calls = [asyncio.create_task(hog.call_tool("custom_scan", {"command": SLOW_SCAN, "timeout": 300}))
                 for _ in range(count)]
        queued = await until_active(hog, count)
        started = time.perf_counter()
        answer = (await small.call_tool("quick_scan", {"target": "127.0.0.1", "rescan": True,
                                                       "timeout": 300})).structured_content
        waited = time.perf_counter() - started
        assert answer["status"] == "completed", answer
        for task_id in queued:
            await hog.call_tool("cancel_task", {"task_id": task_id})
        await asyncio.gather(*calls)
    return waited


async def until_active(client: Any, count: int, timeout_s: float = 120) -> list[str]:
    """The ids of the client's queued and running tasks, once there are `count` of them (the
    server answers to polling only: its tasks are behind MCP)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = (await client.call_tool("list_tasks", {"limit": 100})).structured_content
        active = [task["task_id"] for task in listed["tasks"] if task["status"] in ("queued", "running")]
        if len(active) >= count:
            return active
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{count} tasks were not queued within {timeout_s:g} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare against")
    parser.add_argument("--backlog", type=int, default=20)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    waits: dict[str, list[float]] = {}
    with checkout(args.baseline) as baseline, tempfile.TemporaryDirectory(prefix="bench-fair-") as tmp, \
            contextlib.ExitStack() as stack:
        servers: dict[str, LiveServer] = {}
        for database in args.databases.split(","):
            for side, tree in (("baseline", baseline), ("this", ROOT)):
                where: dict[str, Any] = {"database_url": stack.enter_context(postgres_database())} \
                    if database == "postgresql" else {}
                config = service_config(Path(tmp) / f"{database}-{side}", max_concurrent_tasks=args.slots,
                                        allow_loopback=True, **where)
                add_tokens(config)
                servers[f"{database}, {side}"] = server = start(tree, config)
                stack.callback(server.stop)
        for round_no in range(args.rounds):
            names = list(servers) if round_no % 2 == 0 else list(reversed(servers))
            for name in names:
                waits.setdefault(name, []).append(asyncio.run(small_scan_wait(servers[name].url, args.backlog)))
                print(f"round {round_no + 1}: {name:22} small scan waited {waits[name][-1]:6.2f} s", flush=True)
    print(f"\nmedians of {args.rounds} rounds; backlog {args.backlog} scans of about 2 s, {args.slots} slots")
    for database in args.databases.split(","):
        before = statistics.median(waits[f"{database}, baseline"])
        after = statistics.median(waits[f"{database}, this"])
        print(f"{database:10} baseline {args.baseline[:10]} {before:6.2f} s   this checkout {after:6.2f} s"
              f"   ratio {after / before:.3f}x")


def add_tokens(config: Path) -> None:
    """The two tokens of the benchmark, with no limits their scans could reach."""
    values = json.loads(config.read_text())
    values["tokens"] = {name: {"secret": secret, "limits": NO_LIMITS} for name, secret in SECRETS.items()}
    config.write_text(json.dumps(values))


if __name__ == "__main__":
    main()
