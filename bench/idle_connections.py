"""What an idle process costs PostgreSQL: its connections and its transactions per second.

    .venv/bin/python bench/idle_connections.py [--seconds 60] [--roles worker,api] [--port 22400]

Per role, a fresh scratch database (named idle_*) and one `server.py --worker` or
`server.py --api` on it, with no scan and no client: after it has started (and settled for
--settle seconds), another session on the `postgres` database samples pg_stat_activity every
second for --seconds (the process's connections, and how many of them LISTEN) and reads
pg_stat_database's xact_commit and xact_rollback (a read ends in the pool's rollback) before and
after. Median, most and least connections; commits and rollbacks per second. Idle pooled
connections are closed by the server after db.POOL_IDLE_SECONDS: --settle 70 watches the steady
state, past the connections the start opened.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psycopg
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import postgres_database, service_config, start_api, start_worker, stop_process
from tests.support import POSTGRES_ADMIN_URL


def sample(admin: psycopg.Connection, database: str) -> tuple[int, int]:
    """(connections to `database`, those of them whose last statement was a LISTEN)."""
    row = admin.execute("SELECT count(*), count(*) FILTER (WHERE query ILIKE 'LISTEN%%') FROM pg_stat_activity "
                        "WHERE datname = %s", (database,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def transactions(admin: psycopg.Connection, database: str) -> tuple[int, int]:
    """(commits, rollbacks) of `database` so far: a read ends in a rollback (the pool's reset)."""
    admin.execute("SELECT pg_stat_clear_snapshot()")
    row = admin.execute("SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = %s",
                        (database,)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def watch(database: str, seconds: float) -> tuple[list[int], list[int], tuple[float, float]]:
    """Connections and listeners each second for `seconds`; commits and rollbacks per second."""
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        first, started = transactions(admin, database), time.monotonic()
        connections, listeners = [], []
        while time.monotonic() - started < seconds:
            count, listening = sample(admin, database)
            connections.append(count)
            listeners.append(listening)
            time.sleep(1.0)
        # Idle backends flush their counters to the shared statistics within about a second.
        time.sleep(1.5)
        took_s = time.monotonic() - started - 1.5
        last = transactions(admin, database)
    return connections, listeners, ((last[0] - first[0]) / took_s, (last[1] - first[1]) / took_s)


def measure(role: str, port: int, seconds: float, settle_s: float) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp, postgres_database("idle") as url:
        name = make_url(url).database
        assert name is not None
        config = service_config(Path(tmp), database_url=url, port=port)
        if role == "worker":
            process = start_worker(config)
            stop = lambda: stop_process(process)  # noqa: E731 - one stop for either kind of process
            wait_for_worker(name)
        else:
            server = start_api(config, role="api")
            stop = server.stop
        try:
            time.sleep(settle_s)
            connections, listeners, (commits, rollbacks) = watch(name, seconds)
        finally:
            stop()
    print(f"idle {role:6}: connections median {statistics.median(connections):.0f} (most {max(connections)}, "
          f"least {min(connections)}), listening {max(listeners)};  {commits:.2f} commits/s, "
          f"{rollbacks:.2f} rollbacks/s over {seconds:.0f} s",
          flush=True)


def wait_for_worker(database: str, timeout_s: float = 60.0) -> None:
    """Until the worker's row is in the workers table (it registered: started)."""
    deadline = time.monotonic() + timeout_s
    url = make_url(POSTGRES_ADMIN_URL).set(database=database).render_as_string(hide_password=False)
    while time.monotonic() < deadline:
        with contextlib.suppress(psycopg.Error), psycopg.connect(url, autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM workers").fetchone()
            if row is not None and row[0] > 0:
                return
        time.sleep(0.5)
    raise RuntimeError("the worker did not register within a minute")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--settle", type=float, default=5.0, help="seconds after start before watching")
    parser.add_argument("--roles", default="worker,api")
    parser.add_argument("--port", type=int, default=22400, help="the API's port")
    args = parser.parse_args()
    for role in args.roles.split(","):
        measure(role, args.port, args.seconds, args.settle)


if __name__ == "__main__":
    main()
