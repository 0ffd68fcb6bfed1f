"""A worker trusts no argv from the database: it runs a task only when the argv is the one
the API builds for its options and targets under the worker's own configuration."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import insert

from argv_check import ArgvCheck, TaskRefused
from config import Settings
from db import create_db_engine, upgrade_schema
from models import ScanKind, TaskRecord, TaskStatus, tasks
from policy import Policy
from scanner import XML_OUTPUT
from scans import ScanService, TypedScan
from sharding import shard
from stores import Stores
from tests.commands import HOSTILE_COMMANDS, LEGITIMATE_COMMANDS, PRIVILEGED_COMMANDS
from tests.nodes import MakeNode, argv_for, finished
from tests.support import Listeners, NmapWrapper, own_user_sandbox

pytestmark = pytest.mark.anyio
NMAP = "/usr/bin/nmap"


def record_of(argv: list[str], owner: str = "alice") -> TaskRecord:
    return TaskRecord(id="t", owner=owner, kind=ScanKind.CUSTOM, target="", argv=argv, status=TaskStatus.RUNNING,
                      time_limit=60, created_at=time.time(), started_at=None, finished_at=None, error=None)


def check_of(*, privileged: bool = False, pools: dict[str, list[str]] | None = None, pool: str = "default",
             **settings: object) -> ArgvCheck:
    configured = Settings(allow_loopback=True, privileged=privileged, pools=pools or {}, nmap_path=NMAP,
                          **settings)  # type: ignore[arg-type]
    return ArgvCheck.of_worker(NMAP, Policy(configured, NMAP), privileged=privileged, pool=pool)


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stores]:
    """Stores nothing is written to: ScanService.check reads no table."""
    opened = Stores.open(f"sqlite:///{tmp_path_factory.mktemp('db') / 'tasks.db'}", max_queued=10)
    yield opened
    opened.db.engine.dispose()


def api_argv(stores: Stores, command: str, *, privileged: bool = False) -> list[str]:
    """The argv the API stores for a custom_scan `command`: ScanService.custom, then .check."""
    settings = Settings(allow_loopback=True, privileged=privileged, nmap_path=NMAP)
    service = ScanService(stores, Policy(settings, NMAP), settings, NMAP, None, sandbox=own_user_sandbox())
    return asyncio.run(service.check("alice", service.custom(command))).argv


def built_in_argv(stores: Stores, kind: ScanKind, target: str, *, privileged: bool) -> list[str]:
    settings = Settings(allow_loopback=True, privileged=privileged, nmap_path=NMAP)
    service = ScanService(stores, Policy(settings, NMAP), settings, NMAP, None, sandbox=own_user_sandbox())
    request = service.quick(target) if kind is ScanKind.QUICK else service.full(target)
    return asyncio.run(service.check("alice", request)).argv


def commands(listed: list[tuple[str, list[str]]]) -> list[str]:
    return [command.format(p1=1001, p2=1002, banner=1003) for command, _ in listed]


@pytest.mark.parametrize("command", commands(LEGITIMATE_COMMANDS))
def test_every_argv_the_api_builds_for_a_custom_scan_passes_unchanged(stores: Stores, command: str) -> None:
    argv = api_argv(stores, command)
    assert asyncio.run(check_of().argv_to_run(record_of(argv))) == argv


@pytest.mark.parametrize("command", commands(PRIVILEGED_COMMANDS))
def test_privileged_argvs_pass_a_privileged_worker_and_not_an_unprivileged_one(stores: Stores, command: str) -> None:
    argv = api_argv(stores, command, privileged=True)
    assert asyncio.run(check_of(privileged=True).argv_to_run(record_of(argv))) == argv
    with pytest.raises(TaskRefused):
        asyncio.run(check_of().argv_to_run(record_of(argv)))


@pytest.mark.parametrize("kind", [ScanKind.QUICK, ScanKind.FULL])
@pytest.mark.parametrize("target", ["127.0.0.1", "::1", "127.0.0.0/24"])
def test_built_in_scans_typed_scans_and_shards_pass_unchanged(stores: Stores, kind: ScanKind, target: str) -> None:
    for privileged in (False, True):
        argv = built_in_argv(stores, kind, target, privileged=privileged)
        assert asyncio.run(check_of(privileged=privileged).argv_to_run(record_of(argv))) == argv
    typed = api_argv(stores, TypedScan(target, ports="22,80", service_versions=True, scripts=("banner",)).command())
    assert asyncio.run(check_of().argv_to_run(record_of(typed))) == typed
    network = ipaddress.ip_network(target)
    for piece in shard(typed, [[network]], 64):
        assert asyncio.run(check_of().argv_to_run(record_of(piece.argv))) == piece.argv


def test_the_worker_runs_its_own_nmap_whatever_program_the_row_names(stores: Stores) -> None:
    argv = api_argv(stores, "-p 1001 127.0.0.1")
    assert asyncio.run(check_of().argv_to_run(record_of(["/usr/bin/touch", *argv[1:]])))[0] == NMAP


@pytest.mark.parametrize("command", HOSTILE_COMMANDS)
def test_every_hostile_command_written_straight_into_an_argv_is_refused(command: str, tmp_path: Path) -> None:
    """What custom_scan refuses, a row written past the API gets refused by the worker: the
    hostile words placed where the caller's options go."""
    try:
        words = shlex.split(command.format(tmp=tmp_path))
    except ValueError:
        words = command.split()
    argv = [NMAP, *words, "-n", "-v", "-oX", XML_OUTPUT, "--stats-every", "2s", "--unprivileged", "--", "127.0.0.1"]
    with pytest.raises(TaskRefused):
        asyncio.run(check_of().argv_to_run(record_of(argv)))


@pytest.mark.parametrize(("tamper", "why"), [
    (lambda _: ["/usr/bin/touch", "/tmp/x"], "no '--'"),
    (lambda argv: [*argv[:-1], "localhost"], "not an address or network"),
    (lambda argv: [*argv[:-1], "127.0.0.0/8"], "more than 256 addresses"),
    (lambda argv: [a.replace(" or broadcast", "") for a in argv], "word 8 is '--script="),
    (lambda argv: [*argv[:4], "--datadir", "/tmp", *argv[4:]], "not allowed here"),
    (lambda argv: [a for a in argv if a != "-n"], "server's own flags"),
    (lambda argv: [a for a in argv if a != "--unprivileged"], "word"),
    (lambda argv: [*argv[:-2], "-oN", "/tmp/x", "--", "127.0.0.1"], "word"),
    (lambda argv: [*argv, "-oN", "/tmp/x"], "'-oN' is not a valid target"),
])
def test_a_tampered_argv_is_refused_saying_why(stores: Stores, tamper: Callable[[list[str]], list[str]],
                                                why: str) -> None:
    argv = api_argv(stores, "-sT --script banner -p 1003 127.0.0.1")
    with pytest.raises(TaskRefused, match=why):
        asyncio.run(check_of().argv_to_run(record_of(tamper(argv))))


def test_targets_outside_the_workers_pool_or_the_tokens_networks_are_refused(stores: Stores) -> None:
    argv = api_argv(stores, "-p 1001 127.2.0.1")
    zone = check_of(pools={"zone": ["127.1.0.0/16"], "other": ["127.2.0.0/16"]}, pool="zone")
    with pytest.raises(TaskRefused, match="outside this worker's pool"):
        asyncio.run(zone.argv_to_run(record_of(argv)))
    narrowed = check_of(tokens={"alice": {"secret": "s" * 32, "allowed_targets": ["127.1.0.0/16"]}})
    with pytest.raises(TaskRefused, match="outside the networks this token may scan"):
        asyncio.run(narrowed.argv_to_run(record_of(argv)))
    assert asyncio.run(narrowed.argv_to_run(record_of(argv, owner="bob"))) == argv


async def test_rows_written_past_the_api_never_start_a_program(
    database_url: str, make_node: MakeNode, nmap_wrapper: NmapWrapper, listeners: Listeners, tmp_path: Path
) -> None:
    """The attack of the penetration test: rows inserted into `tasks` by whoever can write the
    database. Each is failed with the reason, nothing but the worker's own nmap ever starts,
    and an honest row inserted the same way still runs."""
    [port] = listeners.open_free_top_ports(1)
    planted = tmp_path / "planted"
    honest = argv_for(nmap_wrapper, port)
    hostile = {
        "touch": ["/usr/bin/touch", str(planted)],
        "touch-with-flags": ["/usr/bin/touch", str(planted), "-n", "--", "127.0.0.1"],
        "reads-a-file": [honest[0], "-iL", "/etc/passwd", *honest[1:]],
        "not-loopback-pool": [*honest[:-1], "localhost"],
    }
    engine = create_db_engine(database_url)
    upgrade_schema(engine)
    now = time.time()
    base = {"owner": "alice", "kind": "custom", "target": "127.0.0.1", "time_limit": 60, "created_at": now,
            "status": "queued", "pool": "default"}
    rows = [base | {"id": name, "argv": json.dumps(argv)} for name, argv in hostile.items()]
    rows.append(base | {"id": "honest-other-program", "argv": json.dumps(["/usr/bin/touch", *honest[1:]]),
                        "created_at": now + 1})
    with engine.begin() as conn:
        conn.execute(insert(tasks), rows)
    engine.dispose()
    node = await make_node(capacity=2)
    for name in hostile:
        final = await finished(node.tasks, name, "alice", 60)
        assert final.status is TaskStatus.FAILED and (final.error or "").startswith("refused by the worker: "), name
        assert final.started_at is None, "nmap never started"
    ran = await finished(node.tasks, "honest-other-program", "alice", 60)
    assert ran.status is TaskStatus.COMPLETED and ran.result is not None
    assert [p.port for p in ran.result.hosts[0].ports] == [port]
    assert not planted.exists()
    assert len(nmap_wrapper.pids()) == 1, "only the honest row started nmap, the worker's own"


def test_an_argv_without_the_owner_s_rate_cap_is_refused(stores: Stores) -> None:
    """Every argv the API builds carries --max-rate, at most its owner's cap: a row with none,
    or with more than the owner may send, is refused (the row's owner is looked up, not the API's)."""
    argv = api_argv(stores, "-p 1001 127.0.0.1")
    at = argv.index("--max-rate")
    assert argv[at + 1] == "50000"
    with pytest.raises(TaskRefused, match="its argv has no --max-rate; its owner's scans send at most 50000"):
        asyncio.run(check_of().argv_to_run(record_of([*argv[:at], *argv[at + 2:]])))
    with pytest.raises(TaskRefused, match="its --max-rate 60000 is above its owner's cap of 50000 packets per second"):
        asyncio.run(check_of().argv_to_run(record_of([*argv[:at + 1], "60000", *argv[at + 2:]])))
    slow = check_of(tokens={"alice": {"secret": "s" * 32, "limits": {"max_rate": 100}}})
    with pytest.raises(TaskRefused, match="above its owner's cap of 100 packets"):
        asyncio.run(slow.argv_to_run(record_of(argv)))
    assert asyncio.run(slow.argv_to_run(record_of(argv, owner="bob"))) == argv
