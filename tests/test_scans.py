"""scans.py without MCP: the scan use case on a real store and real workers (two "processes"
on one database), real nmap on loopback. Sharding, routing to pools, and the answers."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from argv_check import ArgvCheck
from config import Settings
from models import TaskStatus
from policy import NoPool, Policy
from scans import ScanService, without_waiting
from stores import Stores
from supervisor import Supervisor
from tests.support import OWN_USER, SECRETS, Listeners, NmapWrapper, eventually, own_user_sandbox
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
    xml = await second.result("alice", answer.task_id, fmt="xml")
    assert xml.content is not None and xml.content.count("<nmaprun ") == 4
    listed = await second.list_tasks("alice", None, 10)
    assert [t.task_id for t in listed.tasks] == [answer.task_id], "shards are not tasks of their own"


async def test_cancelling_a_sharded_scan_stops_every_shard(
    make_service: MakeService, nmap_wrapper: NmapWrapper
) -> None:
    nmap_wrapper.set_delay(30)
    service = await make_service(shard_addresses=16)
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
