"""Inventory queries as the inventory grows: find_hosts and top_values at 10k and 100k hosts,
on SQLite and PostgreSQL.

    .venv/bin/python bench/inventory_scale.py [--hosts 10000,100000] [--databases sqlite,postgresql]
                                              [--calls 5] [--queries NAME,...]

Per database and size, a throw-away database (PostgreSQL: idle_* on the test server) holding
one token's --hosts hosts (ssh, https and one of 50 other ports open on each, http on one in
ten; products and versions on the ssh and https ports, an OS on half the hosts), seen over the
last 30 days (a thirtieth each day), one host in 100 and one port in 200 changed in the last
day; and the planner's statistics as a running service has them (Database.refresh_statistics
on SQLite, what a process does at start and hourly; VACUUM ANALYZE on PostgreSQL, what its
autovacuum does). Each query of QUERIES through the inventory store, as find_hosts and
top_values run it: medians of --calls, and the ratio of the largest size to the smallest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import insert

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import postgres_database
from db import Database, create_db_engine, upgrade_schema
from inventory import HostQuery, parse_network
from inventory_store import InventoryStore
from models import inventory_hosts, inventory_ports
from tests.test_history_scale import inventory_rows

DAY_S = 86_400.0
NOW = time.time()
LAST_DAY = NOW - DAY_S
# 256 addresses at every size (address n is 10.(n >> 16).(n >> 8 & 255).(n & 255)).
NETWORK = parse_network("10.0.1.0/24")
# Per query: the top_values field it counts (None: a find_hosts page of 50), and its filters.
QUERIES: dict[str, tuple[str | None, HostQuery]] = {
    "find_hosts(port=80)": (None, HostQuery(port=80)),
    "find_hosts(service=ssh)": (None, HostQuery(service="ssh")),
    "find_hosts(changed_since=24h)": (None, HostQuery(changed_since=LAST_DAY)),
    "find_hosts(seen_since=24h)": (None, HostQuery(seen_since=LAST_DAY)),
    "find_hosts(network=/24)": (None, HostQuery(network=NETWORK)),
    "find_hosts(port=80 changed_since=24h)": (None, HostQuery(port=80, changed_since=LAST_DAY)),
    **{f"top_values({field})": (field, HostQuery()) for field in ("port", "service", "product", "version", "os",
                                                                   "status")},
    "top_values(port seen_since=24h)": ("port", HostQuery(seen_since=LAST_DAY)),
    "top_values(service network=/24)": ("service", HostQuery(network=NETWORK)),
}
PRODUCTS = {22: ("OpenSSH", "9.2p1"), 443: ("nginx", "1.22.1")}


def rows(hosts: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """tests/test_history_scale.py's hosts and ports, with the times, products and OS of a
    month of scans (see the module docstring)."""
    host_rows, port_rows = inventory_rows(hosts)
    for n, host in enumerate(host_rows):
        host.update(last_seen=NOW - n % 30 * DAY_S - 60, changed_at=NOW - (600 if n % 100 == 0 else 40 * DAY_S),
                    os=f"Linux 5.{n % 10}" if n % 2 else "")
    for n, port in enumerate(port_rows):
        product, version = PRODUCTS.get(port["port"], ("", ""))
        port.update(changed_at=NOW - (600 if n % 200 == 0 else 40 * DAY_S),
                    product=product, version=f"{version}-{n % 5}" if version else "")
    by_address = {host["address"]: host["last_seen"] for host in host_rows}
    for port in port_rows:
        port["last_seen"] = by_address[port["address"]]
    return host_rows, port_rows


async def run(store: InventoryStore, field: str | None, query: HostQuery) -> object:
    if field is None:
        return await store.find_hosts("alice", query, 50, 0)
    return await store.top_values("alice", field, query, 10)


async def timings(store: InventoryStore, calls: int, names: list[str]) -> dict[str, float]:
    medians = {}
    for name in names:
        times = []
        for _ in range(calls):
            started = time.perf_counter()
            await run(store, *QUERIES[name])
            times.append(time.perf_counter() - started)
        medians[name] = statistics.median(times) * 1000
    return medians


@contextlib.contextmanager
def database(kind: str, directory: Path) -> Iterator[str]:
    """A throw-away database's URL: a SQLite file in `directory`, or an idle_* PostgreSQL database."""
    if kind == "sqlite":
        yield f"sqlite:///{directory / 'tasks.db'}"
    else:
        with postgres_database("idle_inventory") as url:
            yield url


def fill(url: str, hosts: int) -> None:
    engine = create_db_engine(url)
    upgrade_schema(engine)
    host_rows, port_rows = rows(hosts)
    with engine.begin() as conn:
        for table, batch in ((inventory_hosts, host_rows), (inventory_ports, port_rows)):
            for first in range(0, len(batch), 20_000):
                conn.execute(insert(table), batch[first:first + 20_000])
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


async def measure(url: str, calls: int, names: list[str]) -> dict[str, float]:
    db = Database(create_db_engine(url), timeout_s=60)
    try:
        await db.refresh_statistics()
        return await timings(InventoryStore(db), calls, names)
    finally:
        db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="10000,100000", help="comma-separated inventory sizes")
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--queries", default=",".join(QUERIES), help="comma-separated names of QUERIES")
    args = parser.parse_args()
    sizes, names = [int(size) for size in args.hosts.split(",")], args.queries.split(",")
    for kind in args.databases.split(","):
        figures: dict[int, dict[str, float]] = {}
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="bench-inventory-") as tmp, database(kind, Path(tmp)) as url:
                fill(url, size)
                figures[size] = asyncio.run(measure(url, args.calls, names))
        print(f"{kind}: medians of {args.calls} calls, ms at " + " / ".join(f"{size:,} hosts" for size in sizes))
        for name in names:
            times = [figures[size][name] for size in sizes]
            print(f"  {name:36} " + " / ".join(f"{t:8.2f}" for t in times) + f"   x{times[-1] / times[0]:.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
