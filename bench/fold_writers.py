"""Another token's submits while a big scan's verdict and inventory fold are written, on
SQLite and PostgreSQL: how long each submit waits, against how long the verdict and fold take.

    .venv/bin/python bench/fold_writers.py [--hosts 5000]

The scan is a task claimed and started by this script (no nmap runs) whose outcome is
tests/nodes.py big_result (the host of tests/fixtures/rich_loopback.xml under N loopback
addresses); WorkerStore.finish writes its verdict and folds it, as the worker does. 0.3 s
after finish starts, the script submits a scan for another token every 50 ms until finish
returns. A submit waits for the write lock on SQLite: for a batch of the fold (256 hosts), no
longer for the whole fold.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import postgres_database  # noqa: E402
from models import ScanKind, WorkerInfo  # noqa: E402
from scanner import build_argv  # noqa: E402
from tests.nodes import RATED, big_result, opened_stores  # noqa: E402
from tests.support import outcome_of  # noqa: E402

TARGET = "127.0.0.0/16"


async def submits_during_finish(url: str, hosts: int) -> tuple[float, list[float]]:
    """Seconds the verdict and fold took, and each submit's seconds meanwhile."""
    async with opened_stores(url, max_queued=1000) as stores:
        argv = build_argv("nmap", ["-sT", "-p", "1", *RATED], [TARGET], ipv6=False, privileged=False)
        await stores.tasks.submit("alice", ScanKind.CUSTOM, TARGET, argv, 60)
        worker = WorkerInfo(id="bench", name="bench", pool="default", capacity=1)
        [claimed] = await stores.workers.claim(worker, "default", 1)
        await stores.workers.mark_started(claimed, worker)
        outcome = outcome_of(big_result(hosts))
        started = time.monotonic()
        finishing = asyncio.create_task(stores.workers.finish(claimed, worker.id, outcome))
        await asyncio.sleep(0.3)
        waits = []
        while not finishing.done():
            submitted = time.monotonic()
            await stores.tasks.submit("bob", ScanKind.CUSTOM, TARGET, argv, 60)
            waits.append(time.monotonic() - submitted)
            await asyncio.sleep(0.05)
        await finishing
        return time.monotonic() - started, waits


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=5000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        runs = [("sqlite", await submits_during_finish(f"sqlite:///{directory}/bench.db", args.hosts))]
    with postgres_database() as url:
        runs.append(("postgresql", await submits_during_finish(url, args.hosts)))
    for dialect, (total, waits) in runs:
        shown = (f"median {statistics.median(waits) * 1e3:.0f} ms, max {max(waits) * 1e3:.0f} ms" if waits
                 else "none")
        print(f"{dialect:10} verdict+fold {total:.2f} s; {len(waits)} submits during it: {shown}")


if __name__ == "__main__":
    asyncio.run(main())
