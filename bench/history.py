"""What a token's history costs a scan: the freshness lookup at 1k / 10k / 50k completed tasks,
and new-target quick scans per second with an empty vs a 50k-task database.

    .venv/bin/python bench/history.py [--databases sqlite,postgresql] [--calls 300]
                                      [--scans 100] [--clients 10] [--rounds 2] [--lookups-only] [--sections]

Per database:
- lookup: a throw-away database filled (in steps) with 1k, 10k then 50k completed quick scans
  of one token, one every 45 s, each of another target, rows as the task store writes them
  (task_manager's _task_values) with a 2 kB result; then --calls runs of the lookup a shareable
  submit makes under the submit lock (task_manager._select_shareable), for a call never made
  (a miss) and for the token's last one (a hit); and the /ui overview's two lists of every
  token's tasks (the newest 20, the newest 50 completed: TaskManager.recent). Medians.
- sections (--sections): every section of the /ui overview (dashboard.py) as an admin sees
  it, built by an API process's Dashboard in this process, on the same database: beside the
  history, 10 queued and 2 running tasks, 3 workers, and 5 schedules of the token whose runs
  are one in five of its scans, none of them with a change (a stable network: the latest
  change is looked for among all of a schedule's runs). Median ms per section, and the whole
  overview's CPU ms (built and serialized as /ui/api/overview answers it), at each size.
- submissions: two `server.py -c CONFIG` (API and worker in one process, max_concurrent_tasks
  = --clients), one on an empty database, one on a database holding 50k completed tasks of the
  bench token; --clients SDK sessions make --scans quick_scans of targets not scanned before
  (no rescan: each call runs the freshness lookup, and misses), waiting for each result. The
  two alternate for --rounds rounds; scans/s are medians. Goal: empty / 50k within 1.2x.
Targets only 127.0.26.0/24 (--scans x --rounds addresses, at most 254).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from approvals import ApprovalDesk
from bench.common import mcp_session, postgres_database, service_config, start_api
from config import Settings
from dashboard import Dashboard
from db import create_db_engine, upgrade_schema
from models import ScanKind, TaskStatus, schedule_runs, schedules, tasks, workers
from server import Role, Runtime
from task_manager import _select_shareable, _task_values
from tests.nodes import opened_stores
from tests.support import LiveServer

GOAL = 1.2
SIZES = (1_000, 10_000, 50_000)
OWNER = "bench"
ARGV = ["/usr/bin/nmap", "-sT", "-n", "-T4", "--top-ports", "100", "--"]
RESULT = "x" * 2048
FRESHNESS_S = 300.0
# A scan every 45 s: 50k tasks are 26 days of history, inside the default retention of 30 days
# (older ones would be purged, and the file compacted, during the runs), the last day 1,920 tasks.
SPACING_S = 45.0
SCHEDULES = 5


@dataclass(frozen=True)
class Placement:
    """Where the submissions' servers run and scan: `config` gives each server's config keys
    of its own (a port, an nmap that scans inside a network namespace), and PostgreSQL
    databases are named `database_prefix`... ."""

    config: Callable[[], dict[str, object]] = dict
    database_prefix: str = "nmap_mcp_bench"


def history_rows(start: int, stop: int, now: float) -> Iterator[dict[str, Any]]:
    """Completed quick scans number start..stop-1 of the bench token, each of its own target."""
    for n in range(start, stop):
        target = f"10.{n // 65536}.{n // 256 % 256}.{n % 256}"
        values = _task_values(OWNER, ScanKind.QUICK, target, [*ARGV, target], 60, pool="default", share=True,
                              shards=(), address_count=1, probe_count=100, forced=False)
        created = now - n * SPACING_S
        yield values | {"status": TaskStatus.COMPLETED.value, "dedupe_key": None, "created_at": created,
                        "started_at": created, "finished_at": created + 0.5, "result": RESULT}


def fill(engine: Engine, start: int, stop: int) -> None:
    now = time.time()
    rows = list(history_rows(start, stop, now))
    with engine.begin() as conn:
        for first in range(0, len(rows), 5000):
            conn.execute(insert(tasks), rows[first:first + 5000])
    # PostgreSQL's autovacuum would take its statistics; a SQLite database has none of tasks.
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")


def lookup_ms(engine: Engine, target: str, calls: int) -> float:
    """The median time of the freshness lookup of a shareable quick scan of `target`."""
    values = _task_values(OWNER, ScanKind.QUICK, target, [*ARGV, target], 60, pool="default", share=True,
                          shards=(), address_count=1, probe_count=100, forced=False)
    times = []
    with engine.connect() as conn:
        for _ in range(calls):
            started = time.perf_counter()
            _select_shareable(conn, values, time.time() - FRESHNESS_S)
            times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


async def overview_ms(url: str, calls: int) -> tuple[float, float]:
    """The median times of the /ui overview's lists of every token's tasks: the newest 20, and
    the newest 50 completed (dashboard.py)."""
    async with opened_stores(url, max_queued=10) as stores:
        medians = []
        for status, limit in ((None, 20), (TaskStatus.COMPLETED, 50)):
            times = []
            for _ in range(calls):
                started = time.perf_counter()
                await stores.tasks.recent(None, status, limit)
                times.append(time.perf_counter() - started)
            medians.append(statistics.median(times) * 1000)
    return medians[0], medians[1]


def overview_extras(engine: Engine) -> None:
    """What the overview shows beside the history: queued and running tasks, workers, schedules."""
    now = time.time()
    active = []
    for n in range(12):
        values = _task_values(OWNER, ScanKind.QUICK, f"10.255.0.{n}", [*ARGV, f"10.255.0.{n}"], 60, pool="default",
                              share=True, shards=(), address_count=1, probe_count=100, forced=False)
        running = n < 2
        active.append(values | {"status": TaskStatus.RUNNING.value if running else TaskStatus.QUEUED.value,
                                "worker_id": "w0" if running else None, "started_at": now if running else None,
                                "claimed_at": now if running else None,
                                "lease_expires_at": now + 30 if running else None})
    with engine.begin() as conn:
        conn.execute(insert(tasks), active)
        conn.execute(insert(workers), [{"id": f"w{n}", "name": f"worker-{n}", "pool": "default", "capacity": 10,
                                        "running": 2 * (n == 0), "started_at": now, "heartbeat_at": now}
                                       for n in range(3)])
        conn.execute(insert(schedules), [{"id": f"s{n}", "owner": OWNER, "kind": ScanKind.QUICK.value,
                                          "spec": f"10.254.0.{n}", "every": "1h", "created_at": now - 30 * 86_400,
                                          "next_run_at": now + 3600} for n in range(SCHEDULES)])


def schedule_runs_of(start: int, stop: int, now: float) -> list[dict[str, Any]]:
    """The runs of the token's schedules among its scans start..stop-1: one scan in five,
    none with a change."""
    return [{"id": str(uuid.uuid4()), "schedule_id": f"s{n // 5 % SCHEDULES}", "due_at": now - n * SPACING_S,
             "status": "done", "task_id": None, "finished_at": now - n * SPACING_S + 1, "webhook_attempts": 0}
            for n in range(start, stop) if n % 5 == 0]


async def sections_ms(settings: Settings, calls: int) -> dict[str, float]:
    """Median ms of each /ui overview section built for an admin, and of the whole overview's
    CPU (built and serialized)."""
    runtime = Runtime(settings, settings.nmap_path, Role.API)
    await runtime.start()
    try:
        dashboard = Dashboard(runtime.service, runtime.schedules, ApprovalDesk(runtime.stores.approvals,
                                                                                runtime.service.policy),
                              runtime.auditor)
        viewer = dashboard.viewer(OWNER)
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(calls):
            for section in (s for s in dashboard.sections if dashboard.policy.may(viewer.name, s.route)):
                started = time.perf_counter()
                await section.build(viewer)
                times[section.name].append(time.perf_counter() - started)
            started = time.process_time()
            (await dashboard.overview(viewer)).model_dump_json()
            times["overview CPU"].append(time.process_time() - started)
    finally:
        await runtime.stop()
    return {name: statistics.median(values) * 1000 for name, values in times.items()}


def overview_sections(url: str, tmp: Path, calls: int) -> dict[int, dict[str, float]]:
    """sections_ms at each of SIZES."""
    engine = create_db_engine(url)
    upgrade_schema(engine)
    overview_extras(engine)
    where = {"database_url": url} if url.startswith("postgresql") else {"db_path": url.removeprefix("sqlite:///")}
    settings = Settings(tokens={OWNER: {"secret": "bench-secret-" + "0" * 32}}, ui_admin_tokens=[OWNER],
                        audit_log=str(tmp / "audit.jsonl"), log_level="WARNING", nmap_path=ARGV[0], **where)
    figures, filled = {}, 0
    for size in SIZES:
        fill(engine, filled, size)
        with engine.begin() as conn:
            conn.execute(insert(schedule_runs), schedule_runs_of(filled, size, time.time()))
        filled = size
        figures[size] = asyncio.run(sections_ms(settings, calls))
    engine.dispose()
    return figures


def print_sections(database: str, figures: dict[int, dict[str, float]]) -> None:
    print(f"{database}: the /ui overview's sections, median ms at " + " / ".join(f"{size:,}" for size in SIZES)
          + " tasks", flush=True)
    for name in figures[SIZES[0]]:
        times = [figures[size][name] for size in SIZES]
        print(f"  {name:14} " + " / ".join(f"{t:8.2f}" for t in times) + f"   x{times[-1] / times[0]:.1f}", flush=True)


def lookups(url: str, calls: int) -> list[tuple[int, float, float, tuple[float, float]]]:
    """(tasks, miss ms, hit ms, overview lists ms) at each of SIZES."""
    engine = create_db_engine(url)
    upgrade_schema(engine)
    figures, filled = [], 0
    for size in SIZES:
        fill(engine, filled, size)
        filled = size
        figures.append((size, lookup_ms(engine, "10.255.255.255", calls), lookup_ms(engine, "10.0.0.0", calls),
                        asyncio.run(overview_ms(url, max(calls // 10, 5)))))
    engine.dispose()
    return figures


async def scans_per_second(server: LiveServer, targets: list[str], clients: int) -> float:
    """`clients` sessions scanning `targets` (each once), waiting for every result."""
    left, failed = list(targets), []

    async def client_loop(session: Any) -> None:
        while left:
            called = await session.call_tool("quick_scan", {"target": left.pop()})
            if called.is_error or called.structured_content["status"] != "completed":
                failed.append(str(called.content))

    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(mcp_session(server.url)) for _ in range(clients)]
        # The SDK fetches tools/list once per session after its first tools/call: not in the timing.
        await asyncio.gather(*(session.call_tool("list_tasks", {"limit": 1}) for session in sessions))
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(session) for session in sessions))
        took = time.perf_counter() - started
    if failed:
        raise RuntimeError(f"{len(failed)} quick scans did not complete, the first: {failed[0]}")
    return len(targets) / took


def database_url(stack: contextlib.ExitStack, database: str, directory: Path, prefix: str = "nmap_mcp_bench") -> str:
    """A throw-away database of kind `database`: a SQLite file in `directory`, or a PostgreSQL
    database named `prefix`..., dropped when `stack` closes."""
    if database == "postgresql":
        return stack.enter_context(postgres_database(prefix))
    directory.mkdir(parents=True)
    return f"sqlite:///{directory / 'tasks.db'}"


def start_servers(stack: contextlib.ExitStack, database: str, tmp: Path, clients: int,
                  placement: Placement) -> dict[str, LiveServer]:
    """An empty database's server and a 50k-task database's server."""
    servers = {}
    for name, size in (("empty", 0), ("50k", SIZES[-1])):
        directory = tmp / f"{database}-{name}-{uuid.uuid4().hex[:6]}"
        url = database_url(stack, database, directory, placement.database_prefix)
        engine = create_db_engine(url)
        upgrade_schema(engine)
        fill(engine, 0, size)
        engine.dispose()
        where = {"database_url": url} if database == "postgresql" else {"db_path": url.removeprefix("sqlite:///")}
        config = service_config(directory, max_concurrent_tasks=clients, max_queued_tasks=max(100, clients), **where,
                                **placement.config())
        servers[name] = start_api(config)
        stack.callback(servers[name].stop)
    return servers


def submissions(database: str, tmp: Path, args: argparse.Namespace,
                placement: Placement | None = None) -> dict[str, float]:
    """Median scans/s per database size, the runs alternating; the servers placed as
    `placement` says (default: this machine's loopback, random ports)."""
    rates: dict[str, list[float]] = {"empty": [], "50k": []}
    addresses = iter(range(1, 255))
    with contextlib.ExitStack() as stack:
        servers = start_servers(stack, database, tmp, args.clients, placement or Placement())
        for round_no in range(args.rounds):
            for name in (["empty", "50k"] if round_no % 2 == 0 else ["50k", "empty"]):
                targets = [f"127.0.26.{next(addresses)}" for _ in range(args.scans // 2)]
                rates[name].append(asyncio.run(scans_per_second(servers[name], targets, args.clients)))
                print(f"{database} round {round_no + 1}: {name:5} {rates[name][-1]:6.1f} scans/s", flush=True)
    return {name: statistics.median(values) for name, values in rates.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument("--calls", type=int, default=300, help="lookups timed per figure")
    parser.add_argument("--scans", type=int, default=100, help="quick scans per round, half on each database")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--lookups-only", action="store_true", help="without the submissions part")
    parser.add_argument("--sections", action="store_true", help="the /ui overview's sections only")
    args = parser.parse_args()
    if args.scans * args.rounds // 2 * 2 > 254:
        parser.error("--scans x --rounds must stay within the 254 addresses of 127.0.26.0/24")
    for database in args.databases.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-history-") as tmp, contextlib.ExitStack() as stack:
            url = database_url(stack, database, Path(tmp) / "lookup")
            if args.sections:
                print_sections(database, overview_sections(url, Path(tmp), max(args.calls // 10, 5)))
                continue
            for size, miss, hit, (newest, completed) in lookups(url, args.calls):
                print(f"{database} lookup at {size:6} tasks: miss {miss:7.3f} ms  hit {hit:7.3f} ms;  overview lists: "
                      f"newest {newest:7.2f} ms  completed {completed:7.2f} ms", flush=True)
            if args.lookups_only:
                continue
            rates = submissions(database, Path(tmp), args)
        ratio = rates["empty"] / rates["50k"]
        print(f"{database}: {args.scans // 2 * args.rounds} new-target quick scans per size, {args.clients} clients: "
              f"empty {rates['empty']:.1f} scans/s, 50k tasks {rates['50k']:.1f} scans/s, ratio {ratio:.2f}x "
              f"(goal <= {GOAL}x): {'met' if ratio <= GOAL else 'NOT met'}", flush=True)


if __name__ == "__main__":
    main()
