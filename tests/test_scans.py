"""scans.py without MCP: the scan use case on a real store and real workers (two "processes"
on one database), real nmap on loopback. Sharding, routing to pools, the answers, and what a
running or stopped scan shows: open ports as nmap finds them, and what it had when stopped."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from argv_check import ArgvCheck
from config import Settings
from models import HostSummary, ScanKind, TaskAnswer, TaskStatus
from policy import NoPool, Policy
from scans import ScanService, without_waiting
from stores import Stores
from supervisor import Supervisor
from tests.nodes import statements_run
from tests.support import OWN_USER, SECRETS, Listeners, NmapWrapper, SilentServer, eventually, own_user_sandbox
from worker import Worker

pytestmark = pytest.mark.anyio
MakeService = Callable[..., Awaitable[ScanService]]


def settings_for(database_url: str, nmap: NmapWrapper, **overrides: object) -> Settings:
    return Settings(tokens={name: {"secret": secret} for name, secret in SECRETS.items()}, allow_loopback=True,
                    database_url=database_url, nmap_path=str(nmap.path), **OWN_USER | overrides)  # type: ignore[arg-type]


@pytest.fixture
async def make_service(database_url: str, nmap_wrapper: NmapWrapper) -> AsyncIterator[MakeService]:
    """A scan service with its own store and worker, like one process of the service."""
    running: list[tuple[Stores, Worker | None]] = []
    supervisor = Supervisor()

    async def make(*, worker: bool = True, pool: str = "default", **overrides: object) -> ScanService:
        settings = settings_for(database_url, nmap_wrapper, pool=pool, **overrides)
        stores = Stores.open(database_url, max_queued=100)
        await stores.start(supervisor)
        policy = Policy(settings, str(nmap_wrapper.path))
        check = ArgvCheck.of_worker(str(nmap_wrapper.path), policy, privileged=settings.privileged, pool=pool)
        scan_worker = Worker(stores.workers, check, name=f"worker-{len(running)}", pool=pool, capacity=4,
                             grace_seconds=0.5, sandbox=own_user_sandbox())
        if worker:
            await scan_worker.start(supervisor)
        running.append((stores, scan_worker if worker else None))
        return ScanService(stores, policy, settings, str(nmap_wrapper.path), scan_worker if worker else None,
                           sandbox=own_user_sandbox())

    yield make
    for _, scan_worker in running:
        if scan_worker is not None:
            await scan_worker.stop()
    await supervisor.stop()
    for stores, _ in running:
        await stores.stop()
    assert supervisor.failure is None


async def test_a_big_scan_is_sharded_over_two_workers_and_merged(
    make_service: MakeService, listeners: Listeners, nmap_wrapper: NmapWrapper
) -> None:
    [port] = listeners.open_free_top_ports(1)
    first = await make_service(shard_addresses=32)
    second = await make_service(shard_addresses=32, max_answer_bytes=1_000_000)
    answer = await first.scan("alice", first.custom(f"-Pn -p {port} 127.0.0.0/25"), timeout_s=60)
    assert answer.status is TaskStatus.COMPLETED and answer.result is not None
    assert len(nmap_wrapper.pids()) == 4, "four shards of 32 addresses"
    page = await second.result("alice", answer.task_id, view="full", limit=1000)
    assert page.result is not None
    addresses = [host.address for host in page.result.hosts]
    assert addresses == [str(a) for a in ipaddress.ip_network("127.0.0.0/25")], "every host once, in order"
    assert page.result.hosts_total == 128 and not page.result.partial
    open_on = [h.address for h in page.result.hosts if any(p.port == port and p.state == "open" for p in h.ports)]
    assert open_on == ["127.0.0.1"]
    # A page reads the chunks that hold it (each shard's, moved under the scan), not the result.
    with statements_run(second._stores) as statements:
        across = await second.result("alice", answer.task_id, offset=30, limit=4)
    assert across.result is not None and [h.address for h in across.result.hosts] == addresses[30:34]
    chunk_reads = [params for sql, params in statements if "FROM result_chunks" in sql]
    assert len(chunk_reads) == 1 and "result_chunks.first_host > " in next(
        sql for sql, _ in statements if "FROM result_chunks" in sql), "one ranged read of the page's chunks"
    xml = await second.result("alice", answer.task_id, fmt="xml")
    assert xml.content is not None and xml.content.count("<nmaprun ") == 4
    listed = await second.list_tasks("alice", None, 10)
    assert [t.task_id for t in listed.tasks] == [answer.task_id], "shards are not tasks of their own"
    # plan_scan's estimate reads the scan; shard sizing reads each nmap run, with its own probes.
    assert [probes for probes, _ in await second._stores.tasks.history(ScanKind.CUSTOM, "default", 50)] == [128]
    assert [probes for probes, _ in await second._stores.tasks.run_history(ScanKind.CUSTOM, "default", 50)] == [32] * 4


async def test_cancelling_a_sharded_scan_stops_every_shard(
    make_service: MakeService, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(30)
    service = await make_service(shard_addresses=16)
    await make_service(shard_addresses=16)  # a pool of one worker runs every scan whole
    with without_waiting() as submitted:
        await service.scan("alice", service.custom("-Pn -p 1 127.0.0.0/26"), timeout_s=60)
    [parent] = submitted
    assert await eventually(lambda: len(nmap_wrapper.alive()) == 4, 20), "every shard's nmap started"
    started = await service.status("alice", parent.id)
    assert started.status is TaskStatus.RUNNING
    assert started.progress is not None and started.progress.phase.endswith("of 4 shards finished")
    cancelled = await service.cancel("alice", started.task_id)
    assert cancelled.status is TaskStatus.CANCELLED
    for _ in range(100):
        if not nmap_wrapper.alive():
            break
        await asyncio.sleep(0.05)
    assert nmap_wrapper.alive() == [] and len(nmap_wrapper.pids()) == 4


async def test_a_big_scan_on_a_pool_of_one_worker_is_one_nmap_run(
    make_service: MakeService, nmap_wrapper: NmapWrapper
) -> None:
    """However far past shard_addresses, and the worker's 4 slots idle: one task, one nmap."""
    service = await make_service(shard_addresses=16)
    answer = await service.scan("alice", service.custom("-Pn -p 1 127.60.0.0/26"), timeout_s=60)
    assert answer.status is TaskStatus.COMPLETED and answer.result is not None and answer.result.hosts_total == 64
    assert len(nmap_wrapper.pids()) == 1
    [run] = (await service.evidence("alice", answer.task_id)).runs
    assert run.task_id == answer.task_id and run.target == "127.60.0.0/26"


async def test_scans_go_to_the_pool_that_reaches_them(make_service: MakeService, listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    pools = {"near": ["127.0.0.0/24"], "far": ["127.1.0.0/16"]}
    api = await make_service(worker=False, pools=pools)
    await make_service(pool="near", pools=pools)
    answer = await api.scan("alice", api.custom(f"-p {port} 127.0.0.1"), timeout_s=30)
    assert answer.status is TaskStatus.COMPLETED and answer.pool == "near" and answer.worker == "worker-1"
    with pytest.raises(NoPool, match=r"no scanner pool reaches 127\.2\.0\.1"):
        await api.scan("alice", api.custom(f"-p {port} 127.2.0.1"), timeout_s=5)
    with pytest.raises(NoPool, match=r"scan them in separate calls: 127\.0\.0\.1 \(near\); 127\.1\.0\.1 \(far\)"):
        await api.scan("alice", api.custom(f"-p {port} 127.0.0.1 127.1.0.1"), timeout_s=5)
    # No worker serves far yet: the task stays queued however long the call waits.
    queued = await api.scan("alice", api.custom(f"-p {port} 127.1.0.1"), timeout_s=0.5)
    assert queued.status is TaskStatus.QUEUED and queued.pool == "far"
    overview = {p.pool: p for p in (await api.workers()).pools}
    assert overview["far"].queued == 1 and overview["far"].workers_alive == 0
    assert overview["near"].workers_alive == 1 and overview["near"].networks == ["127.0.0.0/24"]
    assert overview["near"].workers[0].capacity == 4


def test_a_token_held_to_networks_of_its_own_has_no_names_resolved_unless_its_config_says_so() -> None:
    tokens = {
        "open": {"secret": "o" * 32},
        "held": {"secret": "h" * 32, "allowed_targets": ["10.1.0.0/16"]},
        "held-resolving": {"secret": "r" * 32, "allowed_targets": ["10.1.0.0/16"], "resolve_names": True},
        "open-literal": {"secret": "l" * 32, "resolve_names": False},
    }
    policy = Policy(Settings(tokens=tokens), "/usr/bin/nmap")  # type: ignore[arg-type]
    assert {name: policy.targets(name).resolve_names for name in tokens} == {
        "open": True, "held": False, "held-resolving": True, "open-literal": False}
    assert policy.targets("local").resolve_names  # the caller over stdio: the server's policy


def test_routing_prefers_the_narrowest_pool_and_honours_a_requested_one() -> None:
    settings = Settings(tokens={"a": {"secret": SECRETS["alice"]}},  # type: ignore[arg-type]
                        pools={"all": ["10.0.0.0/8"], "dmz": ["10.50.0.0/16"]})
    policy = Policy(settings, "/usr/bin/nmap")
    dmz = [("10.50.1.0/24", (ipaddress.ip_network("10.50.1.0/24"),))]
    assert policy.route(dmz, None) == "dmz"
    assert policy.route(dmz, "all") == "all"
    with pytest.raises(NoPool, match=r"pool 'dmz' does not reach 10\.1\.0\.1"):
        policy.route([("10.1.0.1", (ipaddress.ip_network("10.1.0.1/32"),))], "dmz")
    with pytest.raises(NoPool, match="there is no pool 'lab'"):
        policy.route(dmz, "lab")
    plain = Policy(Settings(tokens={"a": {"secret": SECRETS["alice"]}}), "/usr/bin/nmap")  # type: ignore[arg-type]
    assert plain.route(dmz, None) == "default"
    assert json.dumps(plain.pools) == "{}"


# ---- what a running or stopped scan shows ----------------------------------------------------
# A slow tail: nmap scans ports in order (-r), finds the test's listener first, then spends
# about 10 s on 400 closed ports of each of three hosts, one probe per 25 ms. nmap writes a host
# to its XML only when its whole host group is done: at the end here.
SLOW_TAIL = "-r -p {port},31000-31399 --scan-delay 25ms --max-retries 0 {network}.1-3"


@dataclass(frozen=True)
class SlowTail:
    """A SLOW_TAIL scan run by one service and read by another (two processes on one database)."""

    runner: ScanService
    reader: ScanService
    task_id: str
    address: str
    port: int


async def slow_tail_scan(make_service: MakeService, listeners: Listeners) -> SlowTail:
    """Queue a SLOW_TAIL scan of a /24 of the test's own under 127.52.0.0/16, with a port
    listening on its .1 below the tail."""
    network = f"127.52.{random.randint(0, 255)}"
    port = next(p for p in range(10_000, 11_000) if listeners.open(p, f"{network}.1"))
    runner, reader = await make_service(), await make_service(worker=False)
    queued = await runner.scan("alice", runner.custom(SLOW_TAIL.format(port=port, network=network)), timeout_s=0)
    return SlowTail(runner, reader, queued.task_id, f"{network}.1", port)


def announced(answer: TaskAnswer, address: str, port: int) -> HostSummary | None:
    """The host in the answer (summary view) whose open ports list `port`, if any."""
    hosts = answer.result.hosts if answer.result is not None else []
    return next((h for h in hosts if h.address == address and any(
        p.port == port and p.state == "open" for p in h.ports)), None)


async def first_seen(
    scan: SlowTail, nmap: NmapWrapper, within_s: float,
) -> tuple[TaskAnswer, HostSummary | None, float]:
    """Poll get_task_result (view summary) until it lists the scan's port open: that answer,
    the host, and the seconds since nmap started (its start as the nmap wrapper recorded it)."""
    assert await eventually(lambda: bool(nmap.pids()), 30), "nmap did not start"
    started = (nmap.starts / str(nmap.pids()[0])).stat().st_mtime
    while True:
        answer = await scan.reader.result("alice", scan.task_id)
        host = announced(answer, scan.address, scan.port)
        if host is not None or time.time() - started > within_s:
            return answer, host, time.time() - started
        await asyncio.sleep(0.05)


async def test_an_open_port_is_shown_within_seconds_of_nmap_finding_it_not_when_its_host_ends(
    make_service: MakeService, listeners: Listeners, nmap_wrapper: NmapWrapper,
) -> None:
    scan = await slow_tail_scan(make_service, listeners)
    answer, host, seconds = await first_seen(scan, nmap_wrapper, within_s=5)
    print(f"open port shown {seconds:.2f} s after nmap started")
    assert host is not None, f"not shown within 5 s of nmap's start: {answer.result}"
    assert answer.status is TaskStatus.RUNNING and answer.result is not None and answer.result.partial
    assert host.partial and host.status == "up", "unconfirmed until nmap reports the host"
    assert answer.result.hosts_total == 3 and answer.result.scan_time > 0
    await scan.runner.cancel("alice", scan.task_id)


async def test_a_scan_cancelled_before_any_host_finished_keeps_the_ports_nmap_found(
    make_service: MakeService, listeners: Listeners, nmap_wrapper: NmapWrapper,
) -> None:
    scan = await slow_tail_scan(make_service, listeners)
    seen, _, _ = await first_seen(scan, nmap_wrapper, within_s=30)
    # Read after the write that showed the port: a result is read in two transactions, the
    # task's row before its hosts, so `seen` may hold the row from before that write.
    running = await scan.reader.status("alice", scan.task_id)
    assert seen.status is running.status is TaskStatus.RUNNING and running.progress is not None
    # The runner's cancel returns once its worker has stopped nmap and recorded what it had.
    cancelled = await scan.runner.cancel("alice", scan.task_id)
    assert cancelled.status is TaskStatus.CANCELLED and cancelled.progress is None
    assert nmap_wrapper.alive() == []
    kept = await scan.reader.result("alice", scan.task_id)
    assert kept.status is TaskStatus.CANCELLED and kept.progress is None and kept.message is None
    host = announced(kept, scan.address, scan.port)
    assert host is not None and host.partial, "what nmap had announced is kept, still unconfirmed"
    assert kept.result is not None and kept.result.partial
    ran_s = (kept.finished_at or 0) - (kept.started_at or 0)
    assert kept.result.hosts_total == 3, "the addresses nmap was asked to scan"
    assert 0 < kept.result.scan_time <= ran_s + 1, "the time nmap ran"


async def test_a_full_scan_cancelled_during_version_detection_is_partial_without_progress(
    make_service: MakeService, nmap_wrapper: NmapWrapper,
) -> None:
    silent = SilentServer(f"127.52.{random.randint(0, 255)}.3")
    try:
        runner = await make_service(version_detection_seconds=120)
        reader = await make_service(worker=False)
        queued = await runner.scan("alice", runner.full(silent.host), timeout_s=0)

        async def in_version_detection() -> bool:
            progress = (await reader.status("alice", queued.task_id)).progress
            return progress is not None and progress.phase.startswith("version detection (2 of 2)")

        deadline = time.monotonic() + 60
        while not await in_version_detection():
            assert time.monotonic() < deadline, "the version phase did not start"
            await asyncio.sleep(0.1)
        assert await eventually(lambda: len(nmap_wrapper.pids()) == 2, 10), "discovery, then version detection"
        await runner.cancel("alice", queued.task_id)
        assert nmap_wrapper.alive() == []
        status = await reader.status("alice", queued.task_id)
        kept = await reader.result("alice", queued.task_id)
    finally:
        silent.stop()
    assert status.status is TaskStatus.CANCELLED and status.progress is None
    assert kept.status is TaskStatus.CANCELLED and kept.progress is None
    assert kept.result is not None and kept.result.partial, "the README: cancelled results are partial"
    assert announced(kept, silent.host, silent.port) is not None
