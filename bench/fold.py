"""Fold a scan of N hosts into the inventory: first into an empty one, then the same scan
again into one that holds those hosts and M others, on SQLite and PostgreSQL.

    .venv/bin/python bench/fold.py [--hosts 1024,4096] [--others 0,16384] [--runs 3]

The result is built by replicating the host of a real run (tests/fixtures/quick_loopback.xml:
a quick scan of 127.0.0.1, four open ports of the top 100) under distinct addresses of
10.0.0.0/8, parsed by the service's own parser; the M other hosts are the same host under
addresses of 10.128.0.0/9, folded in by a scan of their own network between the two timed
folds. Each fold runs in-process, as the worker runs it after the verdict: the result is
stored as the verdict stores it (chunks, the fold pending; not timed), then folded by
inventory_store.fold_next in transactions of FOLD_BATCH_HOSTS hosts until none is pending (the
clock stops after the last commit). "batch ms" is the median and the longest of those
transactions (of both folds): what another writer waits for the fold, at most. Every run uses a fresh database (a
SQLite file in a temporary directory; a throw-away PostgreSQL database); figures are medians
of --runs, wall time and this process's CPU time (steadier on a busy machine; on PostgreSQL
the server's share is not in it), and the ratio that matters is re-fold / first fold (1.0: a
re-scan costs what the first scan did, whatever else the inventory holds).

Then a scan of all of 10.0.0.0/8 that found one host (the first of the N) is folded ("tail"):
every other known host, the N and the M, is in its scope after its last host, and is marked
down; "tail s" is that fold's wall time (median of the runs) and "longest" the longest of its
transactions (of all runs): what another writer waits for it.
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import postgres_database  # noqa: E402
from db import Database, create_db_engine, upgrade_schema  # noqa: E402
from inventory_store import fold_next  # noqa: E402
from models import ScanKind, ScanResult, TaskRecord, TaskStatus  # noqa: E402
from nmap_report import parse_report  # noqa: E402
from tests.support import store_completed  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "quick_loopback.xml"
OPTIONS = ["-sT", "-T4", "--top-ports", "100", "-n", "-oX", "-"]


def scan_of(network: ipaddress.IPv4Network, hosts: int) -> tuple[str, ScanResult]:
    """A quick scan of `network` that found its first `hosts` addresses up, as parsed."""
    text = FIXTURE.read_text()
    start, end = text.index("<host "), text.index("</host>") + len("</host>")
    host = text[start:end]
    copies = [host.replace('addr="127.0.0.1"', f'addr="{network[i]}"') for i in range(hosts)]
    return str(network), parse_report((text[:start] + "\n".join(copies) + text[end:]).encode(), str(network))


def network_for(first: str, hosts: int) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(f"{first}/{32 - max(hosts - 1, 1).bit_length()}")


# A fold's wall and CPU seconds, and each of its batches' wall seconds.
Fold = tuple[float, float, list[float]]


def timed_fold(db: Database, task_id: str, target: str, result: ScanResult) -> Fold:
    """Wall and CPU seconds of this process (all of the work on SQLite; PostgreSQL's own
    backend is not counted) for one fold, committed, and the wall seconds of each batch."""
    record = TaskRecord(id=task_id, owner="bench", kind=ScanKind.QUICK, target=target,
                        argv=["nmap", *OPTIONS, "--", target], status=TaskStatus.COMPLETED, time_limit=600,
                        created_at=time.time(), started_at=None, finished_at=None, error=None)
    store_completed(db, record, result)
    started, cpu, batches = time.perf_counter(), time.process_time(), []
    while True:
        batch_started = time.perf_counter()
        with db.writing() as conn:
            step = fold_next(conn, "bench", 600.0)
        if step is None:
            return time.perf_counter() - started, time.process_time() - cpu, batches
        batches.append(time.perf_counter() - batch_started)


@contextmanager
def fresh_database(dialect: str) -> Iterator[Database]:
    with tempfile.TemporaryDirectory() as directory, (
            postgres_database() if dialect == "postgresql" else _sqlite_url(directory)) as url:
        # No statement timeout: a slow fold is what is measured.
        db = Database(create_db_engine(url, timeout_s=3600), timeout_s=3600)
        try:
            upgrade_schema(db.engine)
            yield db
        finally:
            db.close()


@contextmanager
def _sqlite_url(directory: str) -> Iterator[str]:
    yield f"sqlite:///{directory}/bench.db"


def one_run(dialect: str, scan: tuple[str, ScanResult], others: tuple[str, ScanResult]) -> tuple[Fold, Fold, Fold]:
    """(first fold into an empty inventory, re-fold after the others were folded in, the
    tail: a scan of 10.0.0.0/8 that found the first host only), each (wall, CPU) seconds and
    its batches' wall seconds."""
    with fresh_database(dialect) as db:
        first = timed_fold(db, "first", *scan)
        if others[1].hosts:
            timed_fold(db, "others", *others)
        again = timed_fold(db, "again", *scan)
        one = scan[1].model_copy(update={"hosts": scan[1].hosts[:1], "hosts_up": 1})
        return first, again, timed_fold(db, "tail", "10.0.0.0/8", one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1024,4096", help="N, comma-separated")
    parser.add_argument("--others", default="0,16384", help="M, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--databases", default="sqlite,postgresql")
    args = parser.parse_args()
    print(f"fold of a quick scan (4 open ports a host, {FIXTURE.name} replicated); medians of {args.runs} runs, "
          "each in a fresh database")
    print(f"{'database':10} {'N':>6} {'M':>6} {'first s':>8} {'re-fold s':>9} {'ratio':>6} {'ms/1k hosts':>11} "
          f"{'CPU first':>9} {'CPU re-fold':>11} {'CPU ratio':>9} {'batch ms':>8} {'longest':>7} {'tail s':>6} "
          f"{'longest':>7}")
    for hosts in map(int, args.hosts.split(",")):
        scan = scan_of(network_for("10.0.0.0", hosts), hosts)
        assert len(scan[1].hosts) == hosts, len(scan[1].hosts)
        for others_count in map(int, args.others.split(",")):
            others = scan_of(network_for("10.128.0.0", others_count), others_count)
            for dialect in args.databases.split(","):
                runs = [one_run(dialect, scan, others) for _ in range(args.runs)]
                (first, cpu_first), (again, cpu_again) = (
                    tuple(statistics.median(run[fold][measure] for run in runs) for measure in (0, 1))
                    for fold in (0, 1))
                batches = [batch for run in runs for fold in run[:2] for batch in fold[2]]
                tail = statistics.median(run[2][0] for run in runs)
                tail_longest = max(batch for run in runs for batch in run[2][2])
                print(f"{dialect:10} {hosts:6} {others_count:6} {first:8.3f} {again:9.3f} {again / first:6.2f} "
                      f"{again * 1e6 / hosts:11.1f} {cpu_first:9.3f} {cpu_again:11.3f} {cpu_again / cpu_first:9.2f} "
                      f"{statistics.median(batches) * 1e3:8.1f} {max(batches) * 1e3:7.1f} {tail:6.2f} "
                      f"{tail_longest * 1e3:7.1f}", flush=True)


if __name__ == "__main__":
    main()
