"""Issue 8: one API process and scan workers as separate real processes on real PostgreSQL.

Every process is `python server.py -c CONFIG` (`--api`, `--worker`, or both roles), started in
a session of its own and stopped by its process group. Processes reach PostgreSQL over its
unix socket, which works from inside a network namespace too. Every scan targets loopback.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import pytest

from tests.namespaces import inside
from tests.support import (
    ALICE,
    START_UP_SECONDS,
    Listeners,
    NmapWrapper,
    PrivatePostgres,
    ServiceProcess,
    SilentServer,
    call_tool,
    error_text,
    eventually,
    free_port,
    poll_until_finished,
    postgres_socket_url,
    scratch_database,
    server_argv,
    wait_until,
    write_config,
)

pytestmark = [pytest.mark.anyio, pytest.mark.server]
# Short leases, so that a dead worker's task is resolved within seconds.
LEASE_SECONDS = 3
# A listener for network namespaces: accept and close every connection, like a quiet service.
NAMESPACE_LISTENER = (
    "import socket, sys\n"
    "s = socket.socket()\n"
    "s.bind((sys.argv[1], int(sys.argv[2])))\n"
    "s.listen(64)\n"
    "print('ready', flush=True)\n"
    "while True:\n"
    "    s.accept()[0].close()\n"
)


class Fleet:
    """The processes of one test: an API and workers, each with a config of its own."""

    def __init__(self, directory: Path, nmap: NmapWrapper, database_url: str) -> None:
        self.directory = directory
        self.nmap = nmap
        self.database_url = database_url
        self.processes: list[ServiceProcess] = []
        self.api_url = ""

    def config(self, name: str, **overrides: object) -> Path:
        """A config of its own for process `name`: this fleet's database, nmap and short leases."""
        settings: dict[str, object] = {
            "database_url": self.database_url, "nmap_path": str(self.nmap.path),
            "audit_log": str(self.directory / f"{name}.audit"),
            "lease_seconds": LEASE_SECONDS, "log_level": "INFO",
        }
        return write_config(self.directory / f"{name}.json", **(settings | overrides))

    def start(self, name: str, *options: str, prefix: tuple[str, ...] = (), **overrides: object) -> ServiceProcess:
        argv = server_argv(self.config(name, **overrides), *options, prefix=prefix)
        process = ServiceProcess(argv, self.directory / f"{name}.log").start()
        self.processes.append(process)
        return process

    def serve(self, *options: str, prefix: tuple[str, ...] = (), **overrides: object) -> ServiceProcess:
        """Start a server that listens (`--api`, or no option: API and worker) and wait until it
        is healthy; the first one is where `call` goes."""
        name = f"server-{len(self.processes)}"
        process = self.start(name, *options, prefix=prefix, **overrides)
        port = json.loads((self.directory / f"{name}.json").read_text())["port"]
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: healthy(process, url), START_UP_SECONDS, 0.1), process.log_text()
        self.api_url = self.api_url or f"{url}/mcp"
        return process

    def log_tails(self, lines: int = 40) -> dict[str, list[str]]:
        """The last lines of every process's log, for a failure's message."""
        return {process.log_path.stem: process.log_text().splitlines()[-lines:] for process in self.processes}

    def worker(self, name: str, prefix: tuple[str, ...] = (), **overrides: object) -> ServiceProcess:
        """Start a `--worker` named `name`; `wait_for_workers` says when it is up."""
        return self.start(name, "--worker", prefix=prefix, worker_name=name, **overrides)

    async def wait_for_workers(self, *names: str, timeout: float = START_UP_SECONDS) -> None:
        """Workers have no HTTP listener: they are up once list_workers shows them alive."""
        deadline = time.monotonic() + timeout
        while set(names) - set(await self.alive_workers()):
            for process in self.processes:
                process.check_running()
            assert time.monotonic() < deadline, f"workers {names} never showed up"
            await asyncio.sleep(0.2)

    async def alive_workers(self) -> dict[str, str]:
        """Name -> pool of every worker list_workers shows alive."""
        listing = await self.call("list_workers", {})
        return {w["name"]: p["pool"] for p in listing["pools"] for w in p["workers"] if w["alive"]}

    async def call(self, tool: str, args: dict[str, Any]) -> dict[str, Any]:
        """A tool call as alice through the first server; its structured answer."""
        result = await call_tool(self.api_url, ALICE, tool, args)
        assert not result.is_error, error_text(result)
        return result.structured_content  # type: ignore[return-value]

    def listen_in(self, namespace: str, address: str, port: int) -> None:
        """A TCP listener inside the network namespace only; returns once it listens."""
        argv = [*inside(namespace), sys.executable, "-c", NAMESPACE_LISTENER, address, str(port)]
        process = ServiceProcess(argv, self.directory / f"listener-{namespace}.log").start()
        self.processes.append(process)
        assert wait_until(lambda: "ready" in process.log_text(), START_UP_SECONDS), process.log_text()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, failure: type[BaseException] | None, *_details: object) -> None:
        """Stop every process; after a test that passed, check that no nmap outlived them."""
        for process in reversed(self.processes):
            process.stop()
        assert failure is not None or wait_until(lambda: self.nmap.alive() == [], 5), "an nmap outlived the processes"


def healthy(process: ServiceProcess, base_url: str) -> bool:
    process.check_running()
    try:
        return httpx.get(f"{base_url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def connect_scan(port: int, address: str = "127.0.0.1") -> dict[str, Any]:
    """custom_scan arguments for one port of one loopback address (no host discovery)."""
    return {"command": f"-sT -Pn -p {port} {address}", "timeout": 60}


def open_ports(answer: dict[str, Any]) -> int:
    assert answer["status"] == "completed", (answer["status"], answer.get("error"), answer.get("message"))
    return answer["result"]["open_ports"]


def parent_pid(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


async def until_started(nmap: NmapWrapper, count: int, timeout: float = 20) -> list[int]:
    """The pids of the nmap starts, once there are `count`."""
    assert await eventually(lambda: len(nmap.pids()) >= count, timeout), f"{len(nmap.pids())} of {count} scans started"
    return nmap.pids()


@pytest.fixture
def fleet(tmp_path: Path, nmap_wrapper: NmapWrapper) -> Iterator[Fleet]:
    """Processes on a fresh database of the test PostgreSQL server, all stopped at the end."""
    with scratch_database() as name, Fleet(tmp_path, nmap_wrapper, postgres_socket_url(name)) as started:
        yield started


@pytest.fixture
def own_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own, started; stopped and deleted at the end."""
    # Under /tmp: the socket path stays short, and user postgres can reach it.
    directory = Path(tempfile.mkdtemp(prefix="nmap-mcp-pg.", dir="/tmp"))
    directory.chmod(0o755)
    server = PrivatePostgres(directory)
    server.start()
    try:
        yield server
    finally:
        if server.running():
            server.stop("immediate")
        shutil.rmtree(directory)


@pytest.fixture
def zones() -> Iterator[dict[str, str]]:
    """Two network namespaces, zone-a and zone-b (names unique to this run), loopback up."""
    names = {zone: f"nmcp-{zone}-{uuid.uuid4().hex[:8]}" for zone in ("zone-a", "zone-b")}
    try:
        for namespace in names.values():
            subprocess.run(["ip", "netns", "add", namespace], check=True)
            subprocess.run([*inside(namespace), "ip", "link", "set", "lo", "up"], check=True)
        yield names
    finally:
        for namespace in names.values():
            subprocess.run(["ip", "netns", "del", namespace], check=False, capture_output=True)


@pytest.mark.postgres  # the fleet's database is on the test server
async def test_scans_submitted_to_the_api_run_on_the_workers(fleet: Fleet, listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    # Workers first: they start while the API does, and need nothing of it.
    fleet.worker("worker-1", max_concurrent_tasks=1)
    fleet.worker("worker-2", max_concurrent_tasks=1)
    fleet.serve("--api")
    await fleet.wait_for_workers("worker-1", "worker-2")
    listing = await fleet.call("list_workers", {})
    [pool] = listing["pools"]
    assert pool["pool"] == "default" and pool["workers_alive"] == 2
    assert sorted((w["name"], w["capacity"]) for w in pool["workers"]) == [("worker-1", 1), ("worker-2", 1)]
    # Each worker runs one scan at a time, so two scans at once are one on each.
    fleet.nmap.set_delay(1)
    answers = await asyncio.gather(*(fleet.call("custom_scan", connect_scan(port)) for _ in range(2)))
    assert [open_ports(a) for a in answers] == [1, 1]
    assert sorted(a["worker"] for a in answers) == ["worker-1", "worker-2"]
    assert {a["pool"] for a in answers} == {"default"}
    assert len(fleet.nmap.pids()) == 2


@pytest.mark.postgres  # the fleet's database is on the test server
async def test_a_wait_on_the_api_is_woken_by_the_worker_within_half_a_second(
    fleet: Fleet, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    fleet.worker("worker-1")
    fleet.serve("--api")
    await fleet.wait_for_workers("worker-1")
    fleet.nmap.set_delay(1.5)
    for _ in range(2):
        answer = await fleet.call("custom_scan", connect_scan(port))
        returned = time.time()
        assert open_ports(answer) == 1 and answer["worker"] == "worker-1"
        # The call would wait 60 s if nothing woke it; it must return right after the verdict.
        assert answer["finished_at"] - answer["started_at"] >= 1.5
        assert 0 <= returned - answer["finished_at"] < 0.5, returned - answer["finished_at"]
        print(f"the call returned {returned - answer['finished_at']:.3f} s after the verdict")


@pytest.mark.postgres  # the fleet's database is on the test server
async def test_cancel_through_the_api_stops_nmap_in_the_worker_within_a_second(fleet: Fleet) -> None:
    fleet.worker("worker-1")
    fleet.serve("--api")
    await fleet.wait_for_workers("worker-1")
    fleet.nmap.set_delay(60)
    waiting = asyncio.ensure_future(fleet.call("custom_scan", connect_scan(free_port())))
    [pid] = await until_started(fleet.nmap, 1)
    [task] = (await fleet.call("list_tasks", {"status": "running"}))["tasks"]
    asked = time.monotonic()
    cancelled = await fleet.call("cancel_task", {"task_id": task["task_id"]})
    assert cancelled["status"] == "cancelled"
    assert await eventually(lambda: fleet.nmap.alive() == [], 1.0), "nmap still runs 1 s after cancel_task"
    print(f"nmap stopped {time.monotonic() - asked:.3f} s after cancel_task was sent")
    assert pid not in fleet.nmap.alive()
    answer = await asyncio.wait_for(waiting, 5)
    assert answer["status"] == "cancelled" and answer["task_id"] == task["task_id"]


@pytest.mark.postgres  # the fleet's database is on the test server
async def test_a_worker_killed_mid_scan_has_its_task_interrupted_and_the_other_goes_on(
    fleet: Fleet, listeners: Listeners
) -> None:
    [port] = listeners.open_free_top_ports(1)
    workers = {name: fleet.worker(name) for name in ("worker-1", "worker-2")}
    fleet.serve("--api")
    await fleet.wait_for_workers(*workers)
    fleet.nmap.set_delay(60)
    waiting = asyncio.ensure_future(fleet.call("custom_scan", connect_scan(port)))
    await until_started(fleet.nmap, 1)
    [task] = (await fleet.call("list_tasks", {"status": "running"}))["tasks"]
    victim = task["worker"]
    [survivor] = set(workers) - {victim}
    workers[victim].kill()
    killed = time.time()
    assert await eventually(lambda: fleet.nmap.alive() == [], 5), "nmap outlived its worker"
    answer = await asyncio.wait_for(waiting, LEASE_SECONDS + 10)
    assert answer["status"] == "interrupted" and answer["task_id"] == task["task_id"]
    assert "stopped before it finished" in answer["error"]
    # Resolved once the lease ran out (at most a lease after the last renewal), not later.
    assert answer["finished_at"] - killed < LEASE_SECONDS + 2, answer["finished_at"] - killed
    print(f"interrupted {answer['finished_at'] - killed:.2f} s after the kill")
    fleet.nmap.set_delay(0)
    second = await fleet.call("custom_scan", connect_scan(port))
    assert open_ports(second) == 1 and second["worker"] == survivor
    deadline = time.monotonic() + LEASE_SECONDS + 5
    while victim in await fleet.alive_workers():
        assert time.monotonic() < deadline, f"{victim} still shown alive"
        await asyncio.sleep(0.2)
    assert survivor in await fleet.alive_workers()


@pytest.mark.postgres  # the fleet's database is on the test server
async def test_a_worker_killed_mid_shard_has_its_shard_run_by_another_and_the_scan_completes(fleet: Fleet) -> None:
    """Two shards on two workers of one slot each. In the second, nmap finishes 127.60.1.8 and .9
    (one host per group) and then waits on .10's silent port (version detection); its worker is
    killed. The shard is queued again, the other worker runs it, and the scan completes with
    every host once: none twice from the hosts the dead run had stored."""
    silent = SilentServer("127.60.1.10")
    try:
        workers = {name: fleet.worker(name, max_concurrent_tasks=1) for name in ("worker-1", "worker-2")}
        fleet.serve("--api", shard_addresses=8)
        await fleet.wait_for_workers(*workers)
        command = f"-sT -Pn -sV --max-hostgroup 1 -p {silent.port} 127.60.1.0/28"
        task_id = (await fleet.call("custom_scan", {"command": command, "timeout": 5}))["task_id"]

        async def found() -> list[str]:
            page = await fleet.call("get_task_result", {"task_id": task_id, "view": "full", "limit": 100})
            return [host["address"] for host in (page.get("result") or {}).get("hosts", [])]

        deadline = time.monotonic() + 30
        while "127.60.1.9" not in await found():
            assert time.monotonic() < deadline, f"the second shard stored no host: {fleet.log_tails()}"
            await asyncio.sleep(0.2)
        [stuck] = fleet.nmap.alive()
        [victim] = [name for name, process in workers.items() if process.pid == parent_pid(stuck)]
        [survivor] = set(workers) - {victim}
        workers[victim].kill()
        silent.stop()  # the run again finds the port closed, and ends at once
        deadline = time.monotonic() + 6 * LEASE_SECONDS + 20
        while (status := await fleet.call("get_task_status", {"task_id": task_id}))["status"] == "running":
            assert time.monotonic() < deadline, f"the scan never finished: {fleet.log_tails()}"
            await asyncio.sleep(0.2)
        assert status["status"] == "completed", status
        addresses = await found()
        assert addresses == [f"127.60.1.{i}" for i in range(16)], "every host once, in order"
        runs = (await fleet.call("get_task_evidence", {"task_id": task_id}))["runs"]
        assert [(run["target"], run["status"]) for run in runs] == [
            ("127.60.1.0/29", "completed"), ("127.60.1.8/29", "completed")]
        assert runs[1]["worker"] == survivor
        assert len(fleet.nmap.pids()) == 3, "two shards, and the killed one once again"
    finally:
        silent.stop()


async def scans_under_way(fleet: Fleet, ports: list[int], delays: tuple[float, ...],
                          **config: object) -> list[asyncio.Future[dict[str, Any]]]:
    """An API and worker-1 with `config`, and a custom_scan call of each port under way, its
    nmap started after its delay (nmap_wrapper's): the calls, still waiting."""
    fleet.worker("worker-1", **config)
    fleet.serve("--api", **config)
    await fleet.wait_for_workers("worker-1")
    calls = []
    for count, (port, delay) in enumerate(zip(ports, delays, strict=True), start=1):
        fleet.nmap.set_delay(delay)
        calls.append(asyncio.ensure_future(fleet.call("custom_scan", connect_scan(port))))
        await until_started(fleet.nmap, count)
    return calls


async def test_a_database_outage_leaves_nothing_stuck(
    tmp_path: Path, nmap_wrapper: NmapWrapper, listeners: Listeners, own_postgres: PrivatePostgres
) -> None:
    ports = listeners.open_free_top_ports(3)
    # The default lease (30 s) outlasts the outage: the running scans stay the worker's.
    with Fleet(tmp_path, nmap_wrapper, own_postgres.url()) as fleet:
        # Two scans end during the outage (their verdicts wait for the database), one after it.
        calls = await scans_under_way(fleet, ports, (4, 4, 14), lease_seconds=30)
        own_postgres.stop("fast")
        stopped = time.time()
        await asyncio.sleep(1)
        for tool, args in (("list_tasks", {}), ("list_workers", {}), ("custom_scan", connect_scan(ports[0]))):
            asked = time.monotonic()
            result = await call_tool(fleet.api_url, ALICE, tool, args)
            took = time.monotonic() - asked
            assert error_text(result).startswith("unavailable: "), (tool, result)
            assert took < 5, f"{tool} took {took:.1f} s in the outage"
            print(f"{tool} answered unavailable in {took:.3f} s")
        async with httpx.AsyncClient(timeout=5) as http:
            health = await http.get(fleet.api_url.removesuffix("/mcp") + "/healthz")
        assert (health.status_code, health.json()["reason"]) == (503, "the task database is not reachable")
        await asyncio.sleep(stopped + 10 - time.time())
        own_postgres.start()
        restarted = time.time()
        answers = await asyncio.wait_for(asyncio.gather(*calls), 30)
        print(f"the waiting scan calls returned {time.time() - restarted:.2f} s after the restart")
        ids = [a["task_id"] for a in answers]
        finished = [await poll_until_finished(fleet.api_url, ALICE, task_id, 30) for task_id in ids]
        assert [a["status"] for a in finished] == ["completed"] * 3, (finished, fleet.log_tails())
        assert [open_ports(a) for a in finished] == [1, 1, 1]
        assert all(a["finished_at"] > restarted for a in finished), [a["finished_at"] - restarted for a in finished]
        print("results written", [round(a["finished_at"] - restarted, 2) for a in finished], "s after restart")
        assert "worker-1" in await fleet.alive_workers()
        nmap_wrapper.set_delay(0)
        assert open_ports(await fleet.call("custom_scan", connect_scan(ports[0]))) == 1
        statuses = [t["status"] for t in (await fleet.call("list_tasks", {}))["tasks"]]
        assert statuses == ["completed"] * 4, "the scan refused in the outage must not have been queued"


async def test_a_database_frozen_longer_than_a_lease_loses_no_running_scan(
    tmp_path: Path, nmap_wrapper: NmapWrapper, listeners: Listeners, own_postgres: PrivatePostgres
) -> None:
    """PostgreSQL stops answering without refusing connections (SIGSTOP: a paused VM, a storage
    pause, a failover's first seconds) for longer than a lease, while scans run. Calls and
    /healthz answer `unavailable` within seconds; when it answers again no scan is interrupted,
    and those that finished meanwhile are saved."""
    ports = listeners.open_free_top_ports(3)
    lease, timeout = 6, 2
    with Fleet(tmp_path, nmap_wrapper, own_postgres.url()) as fleet:
        # Two scans end during the freeze (their verdicts wait for the database), one after it.
        # Their delays leave room for the three starts, one after the other, on a loaded machine
        # (with 3 s the first had ended before the freeze, seen once in a fresh root).
        calls = await scans_under_way(fleet, ports, (6, 6, 16), lease_seconds=lease, database_timeout_seconds=timeout)
        frozen = own_postgres.freeze()
        froze_at = time.time()
        try:
            for tool, args in (("list_tasks", {}), ("custom_scan", connect_scan(ports[0]))):
                asked = time.monotonic()
                async with asyncio.timeout(timeout + 3):
                    result = await call_tool(fleet.api_url, ALICE, tool, args)
                took = time.monotonic() - asked
                assert error_text(result).startswith("unavailable: "), (tool, result)
                print(f"{tool} answered unavailable in {took:.3f} s")
            async with httpx.AsyncClient(timeout=timeout + 3) as http:
                health = await http.get(fleet.api_url.removesuffix("/mcp") + "/healthz")
            assert (health.status_code, health.json()["reason"]) == (503, "the task database is not reachable")
            await asyncio.sleep(froze_at + 1.5 * lease - time.time())
        finally:
            own_postgres.thaw(frozen)
        thawed = time.time()
        print(f"frozen for {thawed - froze_at:.1f} s, lease {lease} s")
        answers = await asyncio.wait_for(asyncio.gather(*calls), 60)
        finished = [await poll_until_finished(fleet.api_url, ALICE, a["task_id"], 60) for a in answers]
        assert [a["status"] for a in finished] == ["completed"] * 3, (finished, fleet.log_tails())
        assert [open_ports(a) for a in finished] == [1, 1, 1]
        assert all(a["finished_at"] > thawed for a in finished[:2]), "the first two finished in the freeze"
        assert "worker-1" in await fleet.alive_workers()
        nmap_wrapper.set_delay(0)
        assert open_ports(await fleet.call("custom_scan", connect_scan(ports[0]))) == 1
        statuses = [t["status"] for t in (await fleet.call("list_tasks", {}))["tasks"]]
        assert statuses == ["completed"] * 4, "the scan refused in the freeze must not have been queued"


@pytest.mark.requires_root("a pid namespace (unshare --pid)")
@pytest.mark.postgres  # the fleet's database is on the test server
async def test_a_second_server_with_the_same_hostname_in_another_pid_namespace_disturbs_nothing(
    fleet: Fleet, listeners: Listeners
) -> None:
    ports = listeners.open_free_top_ports(2)
    # This test is about identity, not expiry: a lease that a busy machine cannot miss.
    first = fleet.serve(lease_seconds=15)
    fleet.nmap.set_delay(8)
    calls = [asyncio.ensure_future(fleet.call("custom_scan", connect_scan(port))) for port in ports]
    pids = await until_started(fleet.nmap, 2)
    assert {parent_pid(pid) for pid in pids} == {first.pid}, "the scans must run in the first server"
    # Same hostname (the default worker name), same database, pids that collide with the host's.
    # No --mount-proc: the server reads nothing of /proc, and unshare can only give it a /proc of
    # its own where / is a mount point, which in a chroot (a root made by debootstrap) it is not.
    fleet.serve(prefix=("unshare", "--pid", "--fork"), lease_seconds=15)
    assert sorted(fleet.nmap.alive()) == pids, "the second server's start stopped a scan of the first"
    hostname = socket.gethostname()
    listing = await fleet.call("list_workers", {})
    [pool] = listing["pools"]
    assert [(w["name"], w["alive"]) for w in pool["workers"]] == [(hostname, True), (hostname, True)]
    answers = await asyncio.wait_for(asyncio.gather(*calls), 30)
    assert [open_ports(a) for a in answers] == [1, 1]
    assert {a["worker"] for a in answers} == {hostname}
    assert all(a["finished_at"] - a["started_at"] >= 8 for a in answers)


@pytest.mark.requires_root("network namespaces (ip netns)")
@pytest.mark.postgres  # the fleet's database is on the test server
async def test_two_network_zones_each_scan_runs_in_the_zone_its_address_routes_to(
    zones: dict[str, str], fleet: Fleet
) -> None:
    port = free_port()
    homes = {"zone-a": "127.1.0.5", "zone-b": "127.2.0.5"}
    for zone, address in homes.items():
        fleet.listen_in(zones[zone], address, port)
    for zone, namespace in zones.items():
        fleet.worker(f"{zone}-worker", prefix=inside(namespace), pool=zone)
    # zone-b also reaches zone-a's /24 through a wider network: the narrowest pool wins, and a
    # scan of zone-a's address can be sent to zone-b on purpose.
    fleet.serve("--api", pools={"zone-a": ["127.1.0.0/24"], "zone-b": ["127.2.0.0/24", "127.1.0.0/16"]})
    await fleet.wait_for_workers("zone-a-worker", "zone-b-worker")
    assert await fleet.alive_workers() == {"zone-a-worker": "zone-a", "zone-b-worker": "zone-b"}
    with socket.socket() as probe:
        assert probe.connect_ex((homes["zone-a"], port)) != 0, "the host must not reach zone-a's listener"
    for zone, address in homes.items():
        routed = await fleet.call("custom_scan", connect_scan(port, address))
        assert (routed["pool"], routed["worker"], open_ports(routed)) == (zone, f"{zone}-worker", 1)
    forced = await fleet.call("custom_scan", connect_scan(port, homes["zone-a"]) | {"pool": "zone-b"})
    assert (forced["pool"], forced["worker"], open_ports(forced)) == ("zone-b", "zone-b-worker", 0)
    before = len((await fleet.call("list_tasks", {"limit": 100}))["tasks"])
    refusals = {
        "no pool reaches it": connect_scan(port, "127.3.0.5"),
        "zone-a does not reach it": connect_scan(port, homes["zone-b"]) | {"pool": "zone-a"},
    }
    for why, args in refusals.items():
        refused = error_text(await call_tool(fleet.api_url, ALICE, "custom_scan", args))
        assert refused.startswith("no_pool: "), (why, refused)
    assert len((await fleet.call("list_tasks", {"limit": 100}))["tasks"]) == before, "a refused scan was queued"
    listing = await fleet.call("list_workers", {})
    assert {p["pool"]: p["queued"] for p in listing["pools"]} == {"zone-a": 0, "zone-b": 0}
    assert {p["pool"]: p["networks"] for p in listing["pools"]} == {
        "zone-a": ["127.1.0.0/24"], "zone-b": ["127.2.0.0/24", "127.1.0.0/16"]}
