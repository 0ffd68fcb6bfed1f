"""A completed scan's fold into the inventory (inventory_store.fold_next, WorkerStore.fold):
after the verdict, in short transactions of a batch of hosts each, read from the stored
chunks; other writers do not wait for the whole of it; a fold a process left midway is finished
by another with the inventory a fold in one go makes; a call that waited for the scan, in
another process than the worker's, finds its hosts in the inventory. On a SQLite file and on
PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

import pytest
from sqlalchemy import Engine, delete, event, insert, select, update

from findings import CHUNK_HOSTS, ScanOutcome
from inventory import HostQuery
from inventory_store import FOLD_BATCH_HOSTS, FOLD_KNOWN_HOSTS, fold_next
from models import (
    ScanKind,
    ScanResult,
    TaskRecord,
    TaskStatus,
    WorkerInfo,
    inventory_hosts,
    inventory_ports,
    tasks,
)
from scanner import build_argv
from sharding import Shard
from stores import Stores
from tests.nodes import RATED, MakeNode, big_result, opened_stores, wait_for, with_whole_result
from tests.support import NmapWrapper, fold_pending, outcome_of, store_completed

pytestmark = pytest.mark.anyio
BIG = 5_000


async def running_task(stores: Stores, nmap: NmapWrapper, owner: str, target: str) -> tuple[TaskRecord, WorkerInfo]:
    """A task of `owner` claimed and started by a worker of this test (no nmap runs)."""
    argv = build_argv(str(nmap.path), ["-sT", "-p", "1", *RATED], [target], ipv6=False, privileged=False)
    await stores.tasks.submit(owner, ScanKind.CUSTOM, target, argv, 60)
    worker = WorkerInfo(id=f"w-{owner}", name=f"w-{owner}", pool="default", capacity=4)
    [claimed] = await stores.workers.claim(worker, "default", 1)
    assert await stores.workers.mark_started(claimed, worker)
    return claimed, worker


def completed(result: ScanResult) -> ScanOutcome:
    return outcome_of(result)


async def test_other_writers_wait_for_a_batch_of_a_big_fold_not_for_the_whole_of_it(
        database_url: str, nmap_wrapper: NmapWrapper) -> None:
    """While 5,000 hosts are folded, another token's submit and the same token's next verdict
    (which takes its turn among the token's folds) are written in a fraction of the fold's time,
    and the fold is still under way when they are."""
    async with opened_stores(database_url, max_queued=50) as stores:
        big, worker = await running_task(stores, nmap_wrapper, "alice", "127.0.0.0/16")
        small, _ = await running_task(stores, nmap_wrapper, "alice", "127.80.0.1")
        started = time.monotonic()
        folding = asyncio.create_task(stores.workers.finish(big, worker.id, completed(big_result(BIG))))
        # The verdict is written, and some hosts folded: the fold is under way.
        assert await wait_for_async(lambda: hosts_of(stores, "alice"), lambda found: found > 0, timeout=120)
        submitted = time.monotonic()
        await stores.tasks.submit("bob", ScanKind.CUSTOM, "127.80.0.2", small.argv, 60)
        submit_s = time.monotonic() - submitted
        verdict = asyncio.create_task(stores.workers.finish(small, worker.id, completed(big_result(1))))
        written = time.monotonic()
        assert await wait_for_async(lambda: stores.tasks.get(small.id, "alice"),
                                    lambda record: record.status is TaskStatus.COMPLETED, timeout=120)
        verdict_s = time.monotonic() - written
        under_way = (await stores.tasks.get(big.id, "alice")).folding
        assert await folding and await verdict
        fold_s = time.monotonic() - started
    assert under_way, ("the writers must have run during the fold to prove anything", submit_s, verdict_s, fold_s)
    assert submit_s < fold_s / 4 and verdict_s < fold_s / 4, (submit_s, verdict_s, fold_s)


async def wait_for_async(read: Any, done: Any, timeout: float) -> bool:
    """Read (a coroutine function) until `done` of what it read, for `timeout` seconds at most."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done(await read()):
            return True
        await asyncio.sleep(0.01)
    return False


async def hosts_of(stores: Stores, owner: str) -> int:
    return (await stores.inventory.find_hosts(owner, HostQuery(state="any"), 1, 0))[1]


def inventory_rows(stores: Stores) -> list[Any]:
    with stores.db.engine.connect() as conn:
        return [conn.execute(select(table).order_by(*table.primary_key.columns)).all()
                for table in (inventory_hosts, inventory_ports)]


def scan_record(task_id: str, target: str) -> TaskRecord:
    argv = ["nmap", "-sT", "-n", "-p", "1-100", "-oX", "-", "--", target]
    return TaskRecord(id=task_id, owner="alice", kind=ScanKind.CUSTOM, target=target, argv=argv,
                      status=TaskStatus.COMPLETED, time_limit=60, created_at=time.time(), started_at=None,
                      finished_at=None, error=None)


def some_hosts(result: ScanResult, keep: Iterable[int]) -> ScanResult:
    wanted = set(keep)
    hosts = [host for i, host in enumerate(result.hosts) if i in wanted]
    return result.model_copy(update={"hosts": hosts, "hosts_up": len(hosts)})


async def test_a_fold_left_midway_is_finished_by_another_process_as_one_fold_in_one_go(database_url: str) -> None:
    """A rescan folded three batches deep, its process gone: another process takes the fold
    over once its lease ran out, and the inventory is the one folding it in one go makes: the
    hosts it found up (first seen at the first scan or now), those of the first scan it did not
    marked down, in every batch's span and after its last host."""
    hosts = 8 * FOLD_BATCH_HOSTS
    first_found = range(0, hosts, 2)
    found_again = [i for i in range(hosts - 10) if i % 3]
    chunks = -(-len(found_again) // CHUNK_HOSTS)
    result = big_result(hosts)
    async with opened_stores(database_url, max_queued=50, lease_seconds=0.5) as stores:
        store_completed(stores.db, scan_record("t1", "127.0.0.0/20"), some_hosts(result, first_found))
        fold_pending(stores.db, "alice")
        before = inventory_rows(stores)
        store_completed(stores.db, scan_record("t2", "127.0.0.0/20"), some_hosts(result, found_again))
        for _ in range(3):  # the process that stops
            with stores.db.writing() as conn:
                step = fold_next(conn, "alice", 0.5)
            assert step is not None and not step.done
        async with opened_stores(database_url, max_queued=50, lease_seconds=0.5) as other:
            await other.workers.fold_stale()
            assert (await other.tasks.get("t2", "alice")).folding, "not before its lease ran out"
            assert await wait_for(lambda: time.time() > lease_of(other), timeout=5)
            await other.workers.fold_stale()
            assert not (await other.tasks.get("t2", "alice")).folding
        resumed = inventory_rows(stores)
        with stores.db.engine.begin() as conn:  # the same fold again, in one go, from the same inventory
            for table, rows in zip((inventory_hosts, inventory_ports), before, strict=True):
                conn.execute(delete(table))
                conn.execute(insert(table), [row._asdict() for row in rows])
            conn.execute(update(tasks).where(tasks.c.id == "t2").values(fold_order=1))
        assert fold_pending(stores.db, "alice") == chunks // (FOLD_BATCH_HOSTS // CHUNK_HOSTS) + 1
        assert inventory_rows(stores) == resumed
    statuses = {row.address: (row.status, row.last_task_id) for row in resumed[0]}
    address = [host.address for host in result.hosts]
    assert len(statuses) == len(set(first_found) | set(found_again))
    assert {i: statuses[address[i]] for i in (0, 1, 4, 6, hosts - 10, hosts - 2)} == {
        0: ("down", "t2"), 1: ("up", "t2"), 4: ("up", "t2"), 6: ("down", "t2"), hosts - 10: ("down", "t2"),
        hosts - 2: ("down", "t2")}


def lease_of(stores: Stores) -> float:
    with stores.db.engine.connect() as conn:
        return float(conn.execute(select(tasks.c.fold_lease).where(tasks.c.id == "t2")).scalar_one())


@contextlib.contextmanager
def hosts_written(engine: Engine) -> Iterator[list[int]]:
    """The inventory host rows each transaction that wrote any wrote, as they commit (the
    drivers count an executemany's rows)."""
    written: list[int] = []
    under_way: dict[Any, int] = {}

    def executed(conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        if statement.startswith("INSERT INTO inventory_hosts"):
            under_way[conn] = under_way.get(conn, 0) + cursor.rowcount

    def committed(conn: Any) -> None:
        if conn in under_way:
            written.append(under_way.pop(conn))

    event.listen(engine, "after_cursor_execute", executed)
    event.listen(engine, "commit", committed)
    try:
        yield written
    finally:
        event.remove(engine, "after_cursor_execute", executed)
        event.remove(engine, "commit", committed)


def statuses(stores: Stores) -> dict[str, tuple[str, str]]:
    with stores.db.engine.connect() as conn:
        return {row.address: (row.status, row.last_task_id) for row in conn.execute(
            select(inventory_hosts.c.address, inventory_hosts.c.status, inventory_hosts.c.last_task_id))}


async def test_the_known_hosts_of_a_scope_after_a_scan_s_last_host_are_marked_down_a_batch_at_a_time(
        database_url: str) -> None:
    """A rescan of a /20 that found again only its first 10 hosts, of 3.5 batches' worth known:
    after its last host, its fold goes through the rest of the scope FOLD_KNOWN_HOSTS known
    hosts per transaction, not in one; each moves the cursor up to where it marked hosts down,
    and what lies after the cursor is untouched until a later one gets there."""
    known = 3 * FOLD_KNOWN_HOSTS + FOLD_KNOWN_HOSTS // 2
    result = big_result(known)
    address = [host.address for host in result.hosts]
    async with opened_stores(database_url, max_queued=50) as stores:
        store_completed(stores.db, scan_record("t1", "127.0.0.0/20"), result)
        fold_pending(stores.db, "alice")
        store_completed(stores.db, scan_record("t2", "127.0.0.0/20"), some_hosts(result, range(10)))
        seen: list[list[int]] = []
        with hosts_written(stores.db.engine) as written:
            while fold_pending_step(stores):
                now = statuses(stores)
                seen.append([i for i in range(known) if now[address[i]] != ("up", "t1")])
    assert written == [FOLD_KNOWN_HOSTS] * 3 + [FOLD_KNOWN_HOSTS // 2]
    assert [len(touched) for touched in seen] == [FOLD_KNOWN_HOSTS * n for n in (1, 2, 3)] + [known]
    assert all(touched == list(range(len(touched))) for touched in seen), "in address order, from the cursor on"
    assert {now[address[i]] for i in range(10)} == {("up", "t2")}
    assert {now[address[i]] for i in range(10, known)} == {("down", "t2")}


async def test_a_batch_s_known_hosts_run_on_across_the_networks_of_a_scope_and_skip_what_lies_between(
        database_url: str) -> None:
    """A rescan of 127.0.0.0/24 and 127.0.2.0/24 that found again the first 10 hosts, of 896
    known from 127.0.0.1 on: the first batch reads the rest of the first network and goes on into
    the second for its 256 known hosts, the next one the rest; 127.0.1.0/24 and what lies after
    the second network stay as they were."""
    result = big_result(3 * FOLD_KNOWN_HOSTS + FOLD_KNOWN_HOSTS // 2)
    record = scan_record("t2", "127.0.0.0/24")
    async with opened_stores(database_url, max_queued=50) as stores:
        store_completed(stores.db, scan_record("t1", "127.0.0.0/20"), result)
        fold_pending(stores.db, "alice")
        argv = [*record.argv, "127.0.2.0/24"]
        store_completed(stores.db, replace(record, argv=argv), some_hosts(result, range(10)))
        with hosts_written(stores.db.engine) as written:
            while fold_pending_step(stores):
                pass
        now = statuses(stores)
    assert written == [FOLD_KNOWN_HOSTS, FOLD_KNOWN_HOSTS - 1]
    networks = {host.address: host.address.rsplit(".", 2)[1] for host in result.hosts}
    assert {now[address] for address, network in networks.items() if network in ("0", "2")} - {("up", "t2")} == {
        ("down", "t2")}
    assert {now[address] for address, network in networks.items() if network in ("1", "3")} == {("up", "t1")}


def fold_pending_step(stores: Stores) -> bool:
    """Fold the next batch of alice's pending folds, in a transaction of its own; False when none is left."""
    with stores.db.writing() as conn:
        return fold_next(conn, "alice", 30.0) is not None


async def test_a_small_scan_s_verdict_marks_down_a_batch_of_known_hosts_and_leaves_the_rest_to_fold_after_it(
        database_url: str, nmap_wrapper: NmapWrapper) -> None:
    """A scan of a /20 that found one host, folded in its verdict's transaction (a batch of hosts
    at most), against 2.5 batches' worth of known hosts: the verdict marks down the first batch
    of them, and the worker the rest, a batch per transaction, before finish returns."""
    known = 2 * FOLD_KNOWN_HOSTS + FOLD_KNOWN_HOSTS // 2
    result = big_result(known)
    async with opened_stores(database_url, max_queued=50) as stores:
        store_completed(stores.db, scan_record("t1", "127.0.0.0/20"), result)
        fold_pending(stores.db, "alice")
        task, worker = await running_task(stores, nmap_wrapper, "alice", "127.0.0.0/20")
        with hosts_written(stores.db.engine) as written:
            assert await stores.workers.finish(task, worker.id, completed(some_hosts(result, [0])))
        record = await stores.tasks.get(task.id, "alice")
        now = statuses(stores)
    assert written == [FOLD_KNOWN_HOSTS, FOLD_KNOWN_HOSTS, FOLD_KNOWN_HOSTS // 2], "the verdict's first"
    assert record.status is TaskStatus.COMPLETED and not record.folding
    assert now[result.hosts[0].address] == ("up", task.id)
    assert {now[host.address] for host in result.hosts[1:]} == {("down", task.id)}


@contextlib.contextmanager
def listening(address: str) -> Iterator[int]:
    """A TCP port of 24000-24999 listening on `address`, as long as the block runs."""
    for port in range(24000, 25000):
        sock = socket.socket()
        try:
            sock.bind((address, port))
        except OSError:
            sock.close()
            continue
        sock.listen(8)
        try:
            yield port
        finally:
            sock.close()
        return
    raise RuntimeError("no free port in 24000-24999")


async def test_a_call_that_waited_for_a_scan_in_another_process_finds_its_hosts_in_the_inventory(
        make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    """The API's process waits, a worker's process scans 127.80.4.0/23 (every loopback address
    answers: 512 hosts, two batches and more to fold) and folds it: the wait ends once the fold
    has, and find_hosts in the API's process finds every host and the port opened here."""
    api = await make_node(worker=False)
    await make_node()
    with listening("127.80.4.1") as port:
        argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", str(port), *RATED], ["127.80.4.0/23"],
                          ipv6=False, privileged=False)
        submitted = (await api.tasks.submit("alice", ScanKind.CUSTOM, "127.80.4.0/23", argv, 120)).record
        record = await api.tasks.wait(submitted.id, "alice", 120)
        found, total = await api.stores.inventory.find_hosts("alice", HostQuery(port=port), 10, 0)
        everything = await hosts_of(api.stores, "alice")
    assert record.status is TaskStatus.COMPLETED and not record.folding, record.error
    assert [host.address for host in found] == ["127.80.4.1"] and total == 1
    assert everything == 512


async def test_each_shard_of_a_scan_is_folded_in_its_own_scope_the_last_from_its_parent_s_hosts(
        make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    """Three shards of 512 addresses, each result more than a batch: each shard's fold marks
    down only the known hosts of its own scope; the last shard's hosts have moved under the
    parent by the time its fold runs (settle_parent, in its verdict) and are folded from there.
    The parent is folding until they are, the shards keep no head, and the parent's result is whole."""
    node = await make_node(worker=False)
    stores = node.stores
    [known] = big_result(1).hosts
    earlier = big_result(1).model_copy(update={"hosts": [
        known.model_copy(update={"address": address}) for address in ("127.0.1.200", "127.0.9.9")]})
    store_completed(stores.db, scan_record("earlier", "127.0.0.0/20"), earlier)
    fold_pending(stores.db, "alice")
    targets = ["127.0.0.0/23", "127.0.2.0/23", "127.0.4.0/23"]
    shards = [Shard(target, build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1", *RATED], [target], ipv6=False,
                                       privileged=False)) for target in targets]
    parent = (await stores.tasks.submit("alice", ScanKind.CUSTOM, "127.0.0.0/21", shards[0].argv, 60,
                                        shards=shards)).record
    worker = WorkerInfo(id="w", name="w", pool="default", capacity=8)
    claimed = sorted(await stores.workers.claim(worker, "default", 3), key=lambda record: record.target)
    whole = big_result(3 * 512 - 1)
    for record in claimed:
        assert await stores.workers.mark_started(record, worker)
        network = ipaddress.ip_network(record.target)
        part = some_hosts(whole, [i for i, host in enumerate(whole.hosts)
                                  if ipaddress.ip_address(host.address) in network and host.address != "127.0.1.200"])
        assert len(part.hosts) > FOLD_BATCH_HOSTS
        assert await stores.workers.finish(record, worker.id, completed(part))
    done = await with_whole_result(stores.tasks, parent.id)
    hosts, total = await stores.inventory.find_hosts("alice", HostQuery(state="any"), 2000, 0)
    with stores.db.engine.connect() as conn:
        heads = conn.execute(select(tasks.c.result).where(tasks.c.parent_id == parent.id)).scalars().all()
    assert done.status is TaskStatus.COMPLETED and not done.folding
    assert done.result is not None and len(done.result.hosts) == len(whole.hosts) - 1
    status = {host.address: (host.status, host.last_task_id) for host in hosts}
    assert total == len(whole.hosts) + 1
    assert status["127.0.1.200"] == ("down", claimed[0].id) and status["127.0.9.9"] == ("up", "earlier")
    assert status[whole.hosts[-1].address] == ("up", claimed[2].id)
    assert heads == [None, None, None], "the parent's merged head replaced theirs"
