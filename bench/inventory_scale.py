"""Inventory queries at 100k hosts on SQLite, without and with the planner's statistics.

    .venv/bin/python bench/inventory_scale.py [--hosts 100000] [--calls 5]

A throw-away SQLite database holding one token's --hosts hosts (ssh, https and one of 50 other
ports open on each, http on one in ten), queried through the inventory store as find_hosts and
top_values do: first as a database without statistics, then after Database.refresh_statistics
(what a process does at start and hourly). Medians of --calls; the time ANALYZE took.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from db import Database, create_db_engine, upgrade_schema
from inventory import HostQuery
from inventory_store import InventoryStore
from models import inventory_hosts, inventory_ports
from tests.test_history_scale import inventory_rows

QUERIES: dict[str, Callable[[InventoryStore], Awaitable[Any]]] = {
    "find_hosts(port=80)": lambda store: store.find_hosts("alice", HostQuery(port=80), 50, 0),
    "find_hosts(service=ssh)": lambda store: store.find_hosts("alice", HostQuery(service="ssh"), 50, 0),
    "top_values(service)": lambda store: store.top_values("alice", "service", HostQuery(), 10),
    "top_values(port)": lambda store: store.top_values("alice", "port", HostQuery(), 10),
}


async def timings(store: InventoryStore, calls: int) -> dict[str, float]:
    medians = {}
    for name, query in QUERIES.items():
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await query(store)
            times.append(time.perf_counter() - started)
        medians[name] = statistics.median(times) * 1000
    return medians


async def measure(url: str, calls: int) -> None:
    db = Database(create_db_engine(url), timeout_s=60)
    store = InventoryStore(db)
    try:
        without = await timings(store, calls)
        started = time.perf_counter()
        await db.refresh_statistics()
        analyze_ms = (time.perf_counter() - started) * 1000
        with_statistics = await timings(store, calls)
    finally:
        db.close()
    for name in QUERIES:
        print(f"{name:24} without statistics {without[name]:8.1f} ms   with {with_statistics[name]:8.1f} ms")
    print(f"refresh_statistics (ANALYZE of the inventory tables) took {analyze_ms:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-inventory-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'tasks.db'}"
        engine = create_db_engine(url)
        upgrade_schema(engine)
        hosts, ports = inventory_rows(args.hosts)
        with engine.begin() as conn:
            conn.execute(insert(inventory_hosts), hosts)
            conn.execute(insert(inventory_ports), ports)
        engine.dispose()
        print(f"{args.hosts} hosts, {len(ports)} ports of one token; medians of {args.calls} calls")
        asyncio.run(measure(url, args.calls))


if __name__ == "__main__":
    main()
