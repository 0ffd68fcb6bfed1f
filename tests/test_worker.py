"""worker.py and worker_store.py: claim -> scan -> finish, leases, hand-overs and shutdown, on
real SQLite and real PostgreSQL, running real nmap on loopback (see tests/nodes.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import time
import zlib
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import insert, select, update
from sqlalchemy.engine import make_url

from db import create_db_engine, upgrade_schema
from findings import ReportSpool, ScanOutcome
from inventory import HostQuery
from models import HostDetail, ScanKind, ScanResult, TaskStatus, WorkerInfo, task_hosts, tasks
from nmap_report import ReportParser
from scanner import build_argv
from sharding import Shard
from task_manager import Submitted, TaskAlreadyFinished
from tests.nodes import (
    RATED,
    MakeNode,
    argv_for,
    big_result,
    finished,
    start_node,
    submit,
    wait_for,
    with_whole_result,
)
from tests.support import POSTGRES_ADMIN_URL, Listeners, NmapWrapper, outcome_of, own_user_sandbox, process_alive
from worker import IDLE_RECHECK_SECONDS, PhaseEnd, Worker, judge
from worker_store import MAX_SHARD_REQUEUES

pytestmark = pytest.mark.anyio
FIXTURES = Path(__file__).parent / "fixtures"


def facts(fixture: str, *, stopped_by: TaskStatus | None = None, problem: str | None = None,
          report: ReportSpool | None = None) -> PhaseEnd:
    """A run's facts, its report recorded from a real nmap run (after `report`'s, when given:
    a full scan's second run)."""
    parser = ReportParser(raw=report or ReportSpool())
    parser.feed((FIXTURES / fixture).read_bytes())
    return PhaseEnd(stopped_by, problem, parser.findings("127.0.0.1"), parser.raw)


def xml_of(outcome: ScanOutcome) -> bytes:
    return b"".join(zlib.decompress(piece.data) for piece in outcome.report.pieces())


def addresses(hosts: list[HostDetail]) -> list[str]:
    return [host.address for host in hosts]


def whole(outcome: ScanOutcome) -> ScanResult | None:
    """The outcome's result with its hosts in it."""
    return outcome.result and outcome.result.model_copy(update={"hosts": outcome.hosts.hosts()})


def test_a_run_without_a_problem_completes_with_its_whole_report() -> None:
    outcome = judge(facts("quick_loopback.xml"))
    assert outcome.status is TaskStatus.COMPLETED and outcome.error is None
    assert outcome.result is not None and not outcome.result.partial
    assert xml_of(outcome) == (FIXTURES / "quick_loopback.xml").read_bytes()
    assert outcome.report.sha256() == hashlib.sha256(xml_of(outcome)).hexdigest()


def test_a_run_that_failed_or_was_stopped_keeps_the_hosts_it_finished_as_partial() -> None:
    failed = judge(facts("killed_midway.xml", problem="the scan ran past its time limit"))
    assert failed.status is TaskStatus.FAILED and failed.error == "the scan ran past its time limit"
    assert failed.result is not None and failed.result.partial and failed.hosts.count == 2
    cancelled = judge(facts("killed_midway.xml", stopped_by=TaskStatus.CANCELLED))
    assert (cancelled.status, cancelled.error) == (TaskStatus.CANCELLED, "cancelled") and cancelled.result is not None
    shut_down = judge(facts("killed_midway.xml", stopped_by=TaskStatus.INTERRUPTED))
    assert shut_down.status is TaskStatus.INTERRUPTED and "shut down" in (shut_down.error or "")
    broke_after_its_report = judge(facts("quick_loopback.xml", problem="nmap exited with status 1"))
    assert broke_after_its_report.result is not None and broke_after_its_report.result.partial, "not completed"
    empty = judge(facts("no_targets.xml", problem="nmap scanned no hosts"))
    assert empty.status is TaskStatus.FAILED and empty.result is None
    never_ran = judge(PhaseEnd(None, "nmap not found at /nowhere/nmap", None, ReportSpool()))
    assert (never_ran.status, never_ran.result, never_ran.error) == (
        TaskStatus.FAILED, None, "nmap not found at /nowhere/nmap")
    assert never_ran.hosts.count == 0 and never_ran.report.size == 0


def test_version_detection_adds_versions_or_leaves_the_discovered_ports_with_a_warning() -> None:
    discovery = facts("quick_loopback.xml")
    assert discovery.found is not None
    versions = facts("rich_loopback.xml", report=discovery.report)
    assert versions.found is not None
    found = judge(discovery, versions)
    assert found.status is TaskStatus.COMPLETED and found.error is None
    detected = {(h.address, p.protocol, p.port): p for h in versions.found.hosts.hosts() for p in h.ports}
    merged = whole(found)
    assert merged is not None and detected, "version detection reported ports"
    assert addresses(merged.hosts) == addresses(discovery.found.hosts.hosts())
    assert all(detected.get((h.address, p.protocol, p.port), p) == p for h in merged.hosts for p in h.ports)
    assert xml_of(found) == b"".join((FIXTURES / name).read_bytes() for name in ("quick_loopback.xml",
                                                                               "rich_loopback.xml"))
    failed = judge(discovery, facts("killed_midway.xml", problem="nmap exited with status 1"))
    assert failed.status is TaskStatus.COMPLETED and failed.result is not None
    assert failed.result.warnings[-1].startswith("version detection did not finish (nmap exited with status 1)")
    cancelled = judge(discovery, facts("killed_midway.xml", stopped_by=TaskStatus.CANCELLED))
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.result is not None
    assert cancelled.result.warnings[-1] == "stopped during version detection" and cancelled.result.partial
    assert addresses(cancelled.hosts.hosts()) == addresses(discovery.found.hosts.hosts()) != []


async def test_concurrency_is_bounded_and_every_task_runs_once(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(0.6)
    node = await make_node(capacity=2)
    records = [await submit(node.tasks, nmap_wrapper, port) for _ in range(6)]
    peak = 0
    waits = asyncio.gather(*(node.tasks.wait(r.id, "alice", timeout_s=60) for r in records))
    while not waits.done():
        peak = max(peak, len(nmap_wrapper.alive()))
        await asyncio.sleep(0.01)
    finals = await waits
    assert peak == 2
    assert all(f.status is TaskStatus.COMPLETED for f in finals)
    assert len(nmap_wrapper.pids()) == 6


async def test_cancel_kills_nmap_and_records_cancelled(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node(capacity=1)
    assert node.worker is not None
    running = await submit(node.tasks, nmap_wrapper, 1)
    queued = await submit(node.tasks, nmap_wrapper, 1)
    assert (await node.tasks.wait(running.id, "alice", timeout_s=0.5)).status is TaskStatus.RUNNING
    assert await wait_for(lambda: len(nmap_wrapper.pids()) == 1)
    [pid] = nmap_wrapper.pids()
    # The queued one first: once the running one stops, the worker's free slot would claim it.
    assert (await node.tasks.cancel(queued.id, "alice")).status is TaskStatus.CANCELLED
    assert (await node.tasks.cancel(running.id, "alice")).status is TaskStatus.CANCELLED
    await node.worker.wait_stopped(running.id, 5)
    assert not process_alive(pid)
    assert nmap_wrapper.pids() == [pid], "a cancelled queued task never starts"
    with pytest.raises(TaskAlreadyFinished, match="already cancelled"):
        await node.tasks.cancel(queued.id, "alice")


async def test_a_submission_hands_the_pools_oldest_task_to_a_free_local_worker(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    """The claim made in the submitting transaction follows the queue's order, as the claim
    loop would: an older queued task goes first. A worker with no slot free claims nothing."""
    [port] = listeners.open_free_top_ports(1)
    node = await make_node(worker=False)  # no claim loop: only hand-overs start scans here
    worker = Worker(node.stores.workers, node.check, name="direct", pool="default", capacity=1, grace_seconds=0.5,
                    sandbox=own_user_sandbox())
    try:
        nmap_wrapper.set_delay(1.5)
        older = await submit(node.tasks, nmap_wrapper, port)
        newer = await worker.hand_over(lambda to: node.tasks.submit(
            "alice", ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap_wrapper, port), 120, claim_for=to))
        assert newer.claimed is not None and newer.claimed.id == older.id != newer.record.id
        assert await wait_for(lambda: worker.running == 1)
        full = await worker.hand_over(lambda to: node.tasks.submit(
            "alice", ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap_wrapper, port), 120, claim_for=to))
        assert full.claimed is None
        final = await finished(node.tasks, older.id, "alice", 30)
        assert final.status is TaskStatus.COMPLETED and final.worker_name == "direct"
        for waiting in (newer.record, full.record):
            assert (await node.tasks.get(waiting.id, "alice")).status is TaskStatus.QUEUED
        assert await wait_for(lambda: worker.running == 0)
        nmap_wrapper.set_delay(0)
        own = await worker.hand_over(lambda to: node.tasks.submit(
            "alice", ScanKind.QUICK, "127.0.0.1", argv_for(nmap_wrapper, port), 120, claim_for=to))
        assert own.claimed is not None and own.claimed.id == newer.record.id, "the slot was given back"
    finally:
        await worker.stop()


async def test_a_caller_cancelled_during_a_hand_over_does_not_strand_its_task(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node(worker=False)
    worker = Worker(node.stores.workers, node.check, name="direct", pool="default", capacity=1, grace_seconds=0.5,
                    sandbox=own_user_sandbox())
    submitting = asyncio.Event()

    async def submit_later(to: WorkerInfo | None) -> Submitted:
        await submitting.wait()
        return await node.tasks.submit("alice", ScanKind.CUSTOM, "127.0.0.1", argv_for(nmap_wrapper, port), 120,
                                       claim_for=to)

    try:
        caller = asyncio.create_task(worker.hand_over(submit_later))
        await asyncio.sleep(0.05)
        caller.cancel()
        submitting.set()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert await wait_for(lambda: worker.running == 1)
        [record] = await node.tasks.recent("alice", None, 10)
        final = await finished(node.tasks, record.id, "alice", 30)
        assert final.status is TaskStatus.COMPLETED and final.worker_name == "direct"
    finally:
        await worker.stop()


async def test_expired_leases_are_resolved_by_any_process(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    """A task claimed by a worker that died before nmap started is queued again (it never
    touched the network); one whose nmap had started is interrupted; a live lease is kept."""
    [port] = listeners.open_free_top_ports(1)
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    now = time.time()
    base = {"owner": "alice", "kind": "custom", "target": "127.0.0.1", "time_limit": 60, "created_at": now,
            "argv": json.dumps(argv_for(nmap_wrapper, port)), "status": "running", "worker_id": "gone"}
    rows = [
        base | {"id": "claimed-never-started", "claimed_at": now - 60, "started_at": None,
                "lease_expires_at": now - 30},
        base | {"id": "started-then-died", "claimed_at": now - 50, "started_at": now - 50, "lease_expires_at": now - 1,
                "progress": json.dumps({"percent": 40.0, "phase": "Connect Scan", "remaining_s": 30})},
        base | {"id": "alive-elsewhere", "claimed_at": now, "started_at": now, "lease_expires_at": now + 3600},
    ]
    with engine.begin() as conn:
        conn.execute(insert(tasks), rows)
    engine.dispose()
    node = await make_node(capacity=1, lease=2)
    requeued = await finished(node.tasks, "claimed-never-started", "alice", 30)
    assert requeued.status is TaskStatus.COMPLETED and requeued.worker_name == "w0"
    assert requeued.result is not None and requeued.result.hosts[0].ports[0].port == port
    died = await node.tasks.get("started-then-died", "alice")
    assert died.status is TaskStatus.INTERRUPTED and "submit it again" in (died.error or "")
    assert died.progress is None, "a finished task has no progress left"
    assert (await node.tasks.get("alive-elsewhere", "alice")).status is TaskStatus.RUNNING
    assert len(nmap_wrapper.pids()) == 1


async def test_a_shard_whose_worker_died_mid_scan_runs_again_and_its_parent_goes_on(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners
) -> None:
    """A started shard whose lease expired is queued again, without the hosts its dead run
    stored (the parent would show them twice), and another worker runs it: its parent
    completes. One that was queued again MAX_SHARD_REQUEUES times is interrupted, and so is its
    parent."""
    [port] = listeners.open_free_top_ports(1)
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    now = time.time()
    argv = json.dumps(argv_for(nmap_wrapper, port))
    parent = {"owner": "alice", "kind": "custom", "target": "127.0.0.1", "time_limit": 60, "created_at": now,
              "argv": argv, "status": "running", "started_at": now - 50, "shard_count": 1, "parent_id": None,
              "requeues": 0, "worker_id": None, "claimed_at": None, "lease_expires_at": None, "progress": None}
    died = {"shard_count": 0, "worker_id": "gone", "claimed_at": now - 50, "lease_expires_at": now - 1,
            "progress": json.dumps({"percent": 40.0, "phase": "Connect Scan", "remaining_s": 30})}
    rows = [parent | {"id": "again"}, parent | died | {"id": "again-1", "parent_id": "again"},
            parent | {"id": "spent"},
            parent | died | {"id": "spent-1", "parent_id": "spent", "requeues": MAX_SHARD_REQUEUES}]
    [stale] = big_result(1).hosts
    with engine.begin() as conn:
        conn.execute(insert(tasks), rows)
        conn.execute(insert(task_hosts), [{"task_id": "again-1", "seq": 0, "data": stale.model_dump_json()},
                                          {"task_id": "again-1", "seq": -1, "data": stale.model_dump_json()}])
    node = await make_node(capacity=1, lease=2)
    again = await finished(node.tasks, "again", "alice", 30)
    assert again.status is TaskStatus.COMPLETED and again.result is not None
    assert [host.address for host in again.result.hosts] == ["127.0.0.1"], "every host once"
    assert [p.port for p in again.result.hosts[0].ports if p.state == "open"] == [port]
    spent = await node.tasks.wait("spent", "alice", timeout_s=30)
    assert spent.status is TaskStatus.INTERRUPTED and "stopped before it finished" in (spent.error or "")
    with engine.connect() as conn:
        shards = {row.id: row for row in conn.execute(select(tasks).where(tasks.c.parent_id.is_not(None)))}
        left = conn.execute(select(task_hosts.c.seq).where(task_hosts.c.task_id == "again-1")).all()
    engine.dispose()
    assert left == [], "the dead run's hosts went when its shard was queued again"
    assert (shards["again-1"].status, shards["again-1"].requeues, shards["again-1"].worker_name) == (
        "completed", 1, "w0")
    assert (shards["spent-1"].status, shards["spent-1"].requeues) == ("interrupted", MAX_SHARD_REQUEUES)
    assert len(nmap_wrapper.pids()) == 1, "only the shard with requeues left ran again"


async def test_shutdown_interrupts_scans_past_the_grace_period_and_keeps_the_queue(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node(capacity=1, grace=0.2)
    record = await submit(node.tasks, nmap_wrapper, 1)
    waiting = await submit(node.tasks, nmap_wrapper, 1)
    await node.tasks.wait(record.id, "alice", timeout_s=0.5)
    assert await wait_for(lambda: len(nmap_wrapper.pids()) == 1)
    [pid] = nmap_wrapper.pids()
    assert node.worker is not None
    await node.worker.stop()
    assert not process_alive(pid)
    final = await node.tasks.get(record.id, "alice")
    assert final.status is TaskStatus.INTERRUPTED and "shut down" in (final.error or "")
    assert (await node.tasks.get(waiting.id, "alice")).status is TaskStatus.QUEUED


async def test_time_limit_stops_the_scan_and_fails_the_task(make_node: MakeNode,
                                                            nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node()
    record = await submit(node.tasks, nmap_wrapper, 1, limit=1)
    final = await finished(node.tasks, record.id, "alice", 30)
    assert final.status is TaskStatus.FAILED and "time limit of 1 s" in (final.error or "")
    assert not nmap_wrapper.alive()


async def test_finishing_is_a_guarded_transition(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    nmap_wrapper.set_delay(30)
    node = await make_node()
    assert node.worker is not None
    record = await submit(node.tasks, nmap_wrapper, 1)
    claimed = await node.tasks.wait(record.id, "alice", timeout_s=0.5)
    await node.tasks.cancel(record.id, "alice")
    late = ScanOutcome(TaskStatus.COMPLETED, None, None)
    assert await node.stores.workers.finish(claimed, node.worker.info.id, late) is False
    assert (await node.tasks.get(record.id, "alice")).status is TaskStatus.CANCELLED


async def test_time_limit_keeps_the_hosts_finished_so_far(make_node: MakeNode, nmap_wrapper: NmapWrapper) -> None:
    node = await make_node()
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1-100", "--scan-delay", "10ms", "--max-hostgroup", "1",
                                                *RATED], ["127.0.0.1-8"], ipv6=False, privileged=False)
    record = (await node.tasks.submit("alice", ScanKind.CUSTOM, "127.0.0.1-8", argv, 3)).record
    final = await finished(node.tasks, record.id, "alice", 30)
    assert final.status is TaskStatus.FAILED and "time limit of 3 s" in (final.error or "")
    assert final.result is not None and final.result.partial
    assert 1 <= len(final.result.hosts) < 8 and final.result.hosts[0].address == "127.0.0.1"
    report = await node.tasks.report_page(record.id, 0, 100)
    assert report is not None and report.text.startswith("<?xml")


async def test_progress_and_finished_hosts_are_readable_from_another_process(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """What a scan has found so far lives in the database, not in the worker's memory."""
    runner = await make_node()
    reader = await make_node(worker=False)
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1-200", "--scan-delay", "10ms", "--max-hostgroup", "1",
                                                *RATED], ["127.0.0.1-8"], ipv6=False, privileged=False)
    record = (await reader.tasks.submit("alice", ScanKind.CUSTOM, "127.0.0.1-8", argv, 120)).record
    deadline = time.monotonic() + 30
    partial = None
    while time.monotonic() < deadline:
        seen = await reader.tasks.get(record.id, "alice")
        page = await reader.tasks.result_page(seen, 0, 1000)
        partial = None if page is None else page.head
        if page is not None and page.count and seen.progress is not None:
            break
        await asyncio.sleep(0.2)
    assert partial is not None and partial.partial and seen.status is TaskStatus.RUNNING
    assert seen.progress is not None and seen.progress.percent >= 0
    await reader.tasks.cancel(record.id, "alice")
    assert runner.worker is not None
    await runner.worker.wait_stopped(record.id, 5)
    stopped = await with_whole_result(reader.tasks, record.id)
    kept = stopped.result
    assert stopped.status is TaskStatus.CANCELLED and kept is not None and kept.partial
    assert [h.address for h in kept.hosts][: len(partial.hosts)] == [h.address for h in partial.hosts]


async def test_a_completed_task_clears_its_live_rows(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    node = await make_node()
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1-50", "--scan-delay", "10ms", "--max-hostgroup", "1",
                                                *RATED], ["127.0.0.1-3"], ipv6=False, privileged=False)
    record = (await node.tasks.submit("alice", ScanKind.CUSTOM, "127.0.0.1-3", argv, 120)).record
    engine = create_db_engine(database_url)
    live = select(task_hosts).where(task_hosts.c.task_id == record.id)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            written = conn.execute(live).all()
        if written:
            break
        await asyncio.sleep(0.1)
    assert written, "no finished host was written while the scan ran"
    final = await finished(node.tasks, record.id, "alice", 60)
    assert final.status is TaskStatus.COMPLETED and final.result is not None and len(final.result.hosts) == 3
    with engine.connect() as conn:
        left = conn.execute(live).all()
        dedupe = conn.execute(select(tasks.c.dedupe_key).where(tasks.c.id == record.id)).scalar_one()
    engine.dispose()
    assert left == [] and dedupe is None


REFUSE_INVENTORY = {
    "sqlite": [("CREATE TRIGGER refuse_inventory BEFORE INSERT ON inventory_hosts "
                "BEGIN SELECT RAISE(ABORT, 'refused by the test'); END")],
    "postgresql": [("CREATE FUNCTION refuse_inventory() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$"),
                   ("CREATE TRIGGER refuse_inventory BEFORE INSERT ON inventory_hosts "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_inventory()")],
}


async def test_a_completed_scan_keeps_its_verdict_when_the_database_refuses_its_inventory_rows(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners,
    caplog: pytest.LogCaptureFixture,
) -> None:
    [port] = listeners.open_free_top_ports(1)
    node = await make_node()
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        for statement in REFUSE_INVENTORY[engine.dialect.name]:
            conn.exec_driver_sql(statement)
    engine.dispose()
    record = await submit(node.tasks, nmap_wrapper, port)
    final = await finished(node.tasks, record.id, "alice", 30)
    assert final.status is TaskStatus.COMPLETED and final.result is not None
    assert final.result.hosts[0].ports[0].port == port
    assert await node.stores.inventory.find_hosts("alice", HostQuery(), 10, 0) == ([], 0)
    assert any("could not be added to the inventory" in r.getMessage() and "refused by the test" in r.exc_text
               for r in caplog.records if r.exc_text), caplog.text


async def test_a_running_task_resolved_by_another_process_has_its_nmap_stopped(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """Another process resolved the task (as a reaper does once its lease expired): the worker
    hears of it and stops its nmap."""
    nmap_wrapper.set_delay(30)
    node = await make_node(lease=3)
    record = await submit(node.tasks, nmap_wrapper, 1)
    assert (await node.tasks.wait(record.id, "alice", timeout_s=1)).status is TaskStatus.RUNNING
    assert await wait_for(lambda: len(nmap_wrapper.alive()) == 1)
    engine = create_db_engine(database_url)
    with engine.begin() as conn:
        conn.execute(update(tasks).where(tasks.c.id == record.id).values(
            status=TaskStatus.INTERRUPTED.value, finished_at=time.time(), lease_expires_at=None))
    engine.dispose()
    final = await finished(node.tasks, record.id, "alice", 10)
    assert final.status is TaskStatus.INTERRUPTED
    assert await wait_for(lambda: nmap_wrapper.alive() == [], 5)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.slow("writes held up 3 s, past a 2 s lease")
async def test_a_database_slower_than_a_lease_interrupts_no_scan(
    make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners, tmp_path: Path,
) -> None:
    """Every write waits 3 s for a lock held elsewhere, longer than the 2 s lease: renewals
    commit late and the reaper's statements wait too. Slow is not dead: the scan completes."""
    [port] = listeners.open_free_top_ports(1)
    nmap_wrapper.set_delay(6)
    node = await make_node(lease=2.0)
    record = await submit(node.tasks, nmap_wrapper, port)
    assert await wait_for(lambda: len(nmap_wrapper.pids()) == 1, 10)
    holder = sqlite3.connect(tmp_path / "tasks.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        await asyncio.sleep(3)
        holder.execute("ROLLBACK")
    finally:
        holder.close()
    final = await finished(node.tasks, record.id, "alice", 30)
    assert final.status is TaskStatus.COMPLETED, final.error
    assert final.result is not None and final.result.hosts[0].ports[0].port == port


async def test_a_big_verdict_is_written_however_long_its_inventory_fold_takes(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """No deadline on a verdict: folding 5,000 hosts into the inventory takes longer than a
    0.2 s deadline, and the verdict is written all the same."""
    node = await make_node(worker=False)
    argv = build_argv(str(nmap_wrapper.path), ["-sT", "-p", "1"], ["127.0.0.0/16"], ipv6=False, privileged=False)
    await node.tasks.submit("alice", ScanKind.CUSTOM, "127.0.0.0/16", argv, 60)
    worker = WorkerInfo(id="big", name="big", pool="default", capacity=1)
    [claimed] = await node.stores.workers.claim(worker, "default", 1)
    assert await node.stores.workers.mark_started(claimed, worker)
    outcome = outcome_of(big_result(5000))
    node.stores.db.timeout_s = 0.2
    started = time.monotonic()
    assert await node.stores.workers.finish(claimed, worker.id, outcome)
    assert time.monotonic() - started > 0.2, "the verdict must take longer than the deadline to prove anything"
    node.stores.db.timeout_s = 5.0
    assert (await node.stores.inventory.find_hosts("alice", HostQuery(), 1, 0))[1] == 5000
    assert (await node.tasks.get(claimed.id, "alice")).status is TaskStatus.COMPLETED


async def test_workers_take_owners_in_fair_turns_oldest_first_within_one(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """One token's backlog (and its shards, each an nmap run) does not hold another token's
    task back: the next slot goes to the owner with the fewest runs in the pool plus place in
    its own queue, so `small` waits for one slot's turn, not for `hog`'s whole queue."""
    node = await make_node(worker=False)
    worker = WorkerInfo(id="turns", name="turns", pool="default", capacity=8)
    shards = [Shard(target, argv_for(nmap_wrapper, 1, target)) for target in ("127.0.0.1", "127.0.0.2", "127.0.0.3")]
    hog = [(await submit(node.tasks, nmap_wrapper, 1, owner="hog")).id for _ in range(3)]
    sharded = await submit(node.tasks, nmap_wrapper, 1, owner="hog", shards=shards)
    small = [(await submit(node.tasks, nmap_wrapper, 1, owner="small")).id for _ in range(2)]
    claimed = [record for _ in range(8) for record in await node.stores.workers.claim(worker, "default", 1)]
    assert [record.id for record in claimed[:5]] == [hog[0], small[0], hog[1], small[1], hog[2]]
    assert [record.parent_id for record in claimed[5:]] == [sharded.id] * 3


async def test_a_claim_of_several_slots_gives_each_owner_its_turn(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    node = await make_node(worker=False)
    worker = WorkerInfo(id="turns", name="turns", pool="default", capacity=8)
    hog = [(await submit(node.tasks, nmap_wrapper, 1, owner="hog")).id for _ in range(4)]
    others = [(await submit(node.tasks, nmap_wrapper, 1, owner=owner)).id for owner in ("small", "carol")]
    claimed = {record.id for record in await node.stores.workers.claim(worker, "default", 3)}
    assert claimed == {hog[0], *others}


async def test_a_worker_bound_to_an_owner_claims_only_that_owner_s_tasks(
    make_node: MakeNode, nmap_wrapper: NmapWrapper
) -> None:
    """A --stdio process's worker (server.Role.STDIO): another token's older task stays queued
    for the fleet, on SQLite and on PostgreSQL (where the claim is one locking statement)."""
    node = await make_node(worker=False)
    desktop = WorkerInfo(id="desktop", name="desktop stdio", pool="default", capacity=8, owner="local")
    teammate = await submit(node.tasks, nmap_wrapper, 1, owner="bob")
    own = [(await submit(node.tasks, nmap_wrapper, 1, owner="local")).id for _ in range(2)]
    claimed = await node.stores.workers.claim(desktop, "default", 8)
    assert [record.id for record in claimed] == own
    assert (await node.tasks.get(teammate.id, "bob")).status is TaskStatus.QUEUED
    fleet = WorkerInfo(id="fleet", name="fleet", pool="default", capacity=8)
    assert [record.id for record in await node.stores.workers.claim(fleet, "default", 8)] == [teammate.id]


def listeners_of(database_url: str, terminate: bool = False) -> int:
    """How many connections to the test database LISTEN (with `terminate`: how many were ended)."""
    what = "count(pg_terminate_backend(pid))" if terminate else "count(*)"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        row = admin.execute(f"SELECT {what} FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN%%'",
                            (make_url(database_url).database,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_an_idle_worker_is_woken_by_notifications_and_still_claims_when_its_listener_is_killed(
    postgres_url: str, nmap_wrapper: NmapWrapper
) -> None:
    """An idle worker looks at the queue only every IDLE_RECHECK_SECONDS (60) by itself: a task
    another process queues reaches it by NOTIFY, and while its listening connection is gone (here
    ended by the server) the change feed wakes it to read, then listens again."""
    worker = await start_node(postgres_url, "idle", nmap_wrapper)
    api = await start_node(postgres_url, "api", nmap_wrapper, worker=False)
    try:
        assert await wait_for(lambda: listeners_of(postgres_url) == 2, timeout=10, every_s=0.2)
        for step in ("notified", "listener killed", "listening again"):
            if step == "listener killed":
                assert listeners_of(postgres_url, terminate=True) == 2
            if step == "listening again":
                assert await wait_for(lambda: listeners_of(postgres_url) == 2, timeout=10, every_s=0.2)
            asked = time.monotonic()
            record = await submit(api.tasks, nmap_wrapper, 1)
            done = await api.tasks.wait(record.id, "alice", timeout_s=20)
            assert done.status is TaskStatus.COMPLETED, step
            assert time.monotonic() - asked < IDLE_RECHECK_SECONDS / 3, step
    finally:
        await api.stop()
        await worker.stop()
