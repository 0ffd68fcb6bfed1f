"""Nodes for the store and worker tests: what one process of the service holds.

A node is the stores of one process (their own engine), its lease reaper and, unless it
serves the API only, a worker, their loops watched by a supervisor. Two nodes on one database
behave like two processes for everything that goes through the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import event

from argv_check import ArgvCheck
from config import DEFAULT_LIMITS, Settings
from models import ScanKind, ScanResult, TaskRecord
from nmap_report import ReportParser
from policy import Policy
from result_store import assembled
from scanner import build_argv
from stores import Stores
from supervisor import Supervisor
from task_manager import TaskManager
from tests.support import FIXTURES, NmapWrapper, own_user_sandbox
from worker import Worker, fold_stale_forever, resolve_expired_forever


@dataclass
class Node:
    stores: Stores
    worker: Worker | None
    supervisor: Supervisor
    # What the node's workers may run: the test's nmap, on loopback.
    check: ArgvCheck

    @property
    def tasks(self) -> TaskManager:
        return self.stores.tasks

    async def stop(self) -> None:
        if self.worker is not None:
            await self.worker.stop()
        await self.supervisor.stop()
        await self.stores.stop()


MakeNode = Callable[..., Awaitable[Node]]


def loopback_check(nmap: NmapWrapper, pool: str = "default") -> ArgvCheck:
    """A worker's check for the tests' scans: `nmap`, loopback allowed, /16 networks at most."""
    settings = Settings(allow_loopback=True, max_addresses_per_scan=65_536, nmap_path=str(nmap.path))
    return ArgvCheck.of_worker(str(nmap.path), Policy(settings, str(nmap.path)), privileged=False, pool=pool)


async def start_node(database_url: str, name: str, nmap: NmapWrapper, *, capacity: int = 4, max_queued: int = 50,
                     grace: float = 0.5, lease: float = 30.0, pool: str = "default", worker: bool = True) -> Node:
    """A node on `database_url` whose worker (started unless `worker` is false) is called `name`
    and runs `nmap`."""
    stores = Stores.open(database_url, max_queued=max_queued, lease_seconds=lease)
    supervisor = Supervisor()
    await stores.start(supervisor)
    check = loopback_check(nmap, pool)
    scan_worker = Worker(stores.workers, check, name=name, pool=pool, capacity=capacity, grace_seconds=grace,
                         sandbox=own_user_sandbox())
    if worker:
        await scan_worker.start(supervisor)
    supervisor.start("lease-reaper", resolve_expired_forever(stores.workers, stores.db, max(lease / 4, 0.2)))
    supervisor.start("inventory-folds", fold_stale_forever(stores.workers, max(lease / 4, 0.2)))
    return Node(stores, scan_worker if worker else None, supervisor, check)


@contextlib.asynccontextmanager
async def opened_stores(database_url: str, **options: Any) -> AsyncIterator[Stores]:
    """The stores of one process on `database_url`, started for the block, their loops watched:
    none of them may have died by its end."""
    stores = Stores.open(database_url, **options)
    supervisor = Supervisor()
    await stores.start(supervisor)
    try:
        yield stores
    finally:
        await supervisor.stop()
        await stores.stop()
    assert supervisor.failure is None


def big_result(hosts: int) -> ScanResult:
    """The result of a big scan: the host of a real run (tests/fixtures/rich_loopback.xml: -sV,
    -O and a script) under `hosts` loopback addresses."""
    report = ReportParser()
    report.feed((FIXTURES / "rich_loopback.xml").read_bytes())
    result = report.result("127.0.0.0/8")
    [host] = result.hosts
    copies = [host.model_copy(update={"address": f"127.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"})
              for i in range(1, hosts + 1)]
    open_ports = sum(port.state == "open" for port in host.ports) * hosts
    return result.model_copy(update={"hosts": copies, "hosts_up": hosts, "hosts_total": hosts,
                                     "open_ports": open_ports})


# The rate cap every argv the server builds carries, which a worker requires (argv_check).
RATED = ["--max-rate", str(DEFAULT_LIMITS.max_rate)]


def argv_for(nmap: NmapWrapper, port: int, target: str = "127.0.0.1") -> list[str]:
    return build_argv(str(nmap.path), ["-sT", "-p", str(port), *RATED], [target], ipv6=False, privileged=False)


async def submit(tasks: TaskManager, nmap: NmapWrapper, port: int, owner: str = "alice", limit: int = 120,
                 **options: object) -> TaskRecord:
    """A custom scan of `port` on 127.0.0.1, queued for `owner`."""
    return (await tasks.submit(owner, ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap, port), limit, **options)).record


async def finished(tasks: TaskManager, task_id: str, owner: str = "alice", timeout_s: float = 30) -> TaskRecord:
    """The task once it finished (or `timeout_s` passed), with its whole result."""
    await tasks.wait(task_id, owner, timeout_s)
    return await with_whole_result(tasks, task_id, owner)


async def with_whole_result(tasks: TaskManager, task_id: str, owner: str = "alice") -> TaskRecord:
    """The task with its whole result assembled from what is stored (None when it has none)."""
    record, parts = await tasks.stored_result(task_id, owner)
    return replace(record, result=assembled(parts)) if parts is not None else record


async def wait_for(condition: Callable[[], bool], timeout: float = 5, every_s: float = 0.02) -> bool:
    """Poll `condition` while the event loop (and the worker on it) keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not condition():
        await asyncio.sleep(every_s)
    return condition()


@contextlib.contextmanager
def statements_run(stores: Stores) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (with their parameters) the stores run within the block, in order."""
    seen: list[tuple[str, Any]] = []

    def note(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(stores.db.engine, "before_cursor_execute", note)
    try:
        yield seen
    finally:
        event.remove(stores.db.engine, "before_cursor_execute", note)
