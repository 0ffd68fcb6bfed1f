"""Every inventory query on SQLite and PostgreSQL alike: each find_hosts filter and each
top_values field over one inventory, built by the store's own fold of two scans (a version
scan, then a quick scan that changed a few things), with one expected answer for both
databases.

The first scan, -sV, finds 127.51.7.1-4; the second, a quick scan, finds .2 gone, a port of
.1 opened, one of .4 closed and a new host .5. The quick scan names the services from the
port numbers (5000 'upnp'), which the version scan's findings outlive."""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy.engine import make_url

import inventory_store
from db import Database, create_db_engine, upgrade_schema
from inventory import HostQuery, parse_network
from inventory_store import InventoryStore
from models import (
    ExtraPorts,
    HostDetail,
    InventoryPort,
    InventoryText,
    OsMatch,
    PortDetail,
    PortText,
    ScanKind,
    ScannedPorts,
    ScanResult,
    ScriptOutput,
    TaskRecord,
    TaskStatus,
    ValueCount,
)
from tests.support import POSTGRES_ADMIN_URL, fold_pending, scratch_database, store_completed

pytestmark = pytest.mark.anyio
NETWORK = "127.51.7.0/29"
ONE, TWO, THREE, FOUR, FIVE = (f"127.51.7.{i}" for i in range(1, 6))


def port(number: int, state: str, service: str, product: str = "", version: str = "", *, protocol: str = "tcp",
         extrainfo: str = "", cpe: tuple[str, ...] = (), scripts: tuple[str, ...] = ()) -> PortDetail:
    text = PortText(product=product, version=version, extrainfo=extrainfo, cpe=list(cpe),
                    scripts=[ScriptOutput(id=s, output="...") for s in scripts])
    return PortDetail(port=number, protocol=protocol, state=state, service=service,
                      untrusted=text if any(text.texts()) else None)


def host(address: str, *ports: PortDetail, os: str = "") -> HostDetail:
    return HostDetail(address=address, status="up", hostnames=[], ports=list(ports), reason="syn-ack",
                      os_matches=[OsMatch(name=os, accuracy=96)] if os else [],
                      extraports=[ExtraPorts(state="closed", count=10)])


def result(*hosts: HostDetail) -> ScanResult:
    return ScanResult(target=NETWORK, scan_time=1.0, hosts_up=len(hosts), hosts_down=8 - len(hosts), hosts_total=8,
                      open_ports=0, hosts=list(hosts), exit_status="success",
                      scanned=[ScannedPorts(protocol="tcp", services="22,80,443,3389,5000,6000,8080"),
                               ScannedPorts(protocol="udp", services="53")])


VERSION_SCAN = result(
    host(ONE, port(22, "open", "ssh", "OpenSSH", "9.2p1", extrainfo="protocol 2.0",
                   cpe=("cpe:/a:openbsd:openssh:9.2p1",), scripts=("banner",)),
         port(80, "open", "http", "nginx", "1.18.0", cpe=("cpe:/a:igor_sysoev:nginx:1.18.0",)),
         port(443, "closed", "https"), os="Linux 5.0 - 5.14"),
    host(TWO, port(22, "open", "ssh", "OpenSSH", "7.4", cpe=("cpe:/a:openbsd:openssh:7.4",)),
         port(53, "open|filtered", "domain", protocol="udp")),
    host(THREE, port(3389, "filtered", "ms-wbt-server")),
    host(FOUR, port(5000, "open", "http", "Werkzeug httpd", "2.2.2"), port(6000, "open", "X11")),
)
QUICK_SCAN = result(
    host(ONE, port(22, "open", "ssh"), port(80, "open", "http"), port(443, "open", "https")),
    host(THREE, port(3389, "filtered", "ms-wbt-server")),
    host(FOUR, port(5000, "open", "upnp"), port(6000, "closed", "X11")),
    host(FIVE, port(8080, "open", "http-proxy")),
)


@dataclass
class Inventory:
    store: InventoryStore
    db: Database
    between: float  # after the version scan, before the quick scan


def fold_scan(db: Database, task_id: str, kind: ScanKind, options: list[str], scanned: ScanResult,
              target: str = NETWORK) -> None:
    """Fold a completed scan into alice's inventory, as the verdict of its task does."""
    record = TaskRecord(id=task_id, owner="alice", kind=kind, target=target,
                        argv=["nmap", *options, "-n", "-oX", "-", "--", target], status=TaskStatus.COMPLETED,
                        time_limit=60, created_at=time.time(), started_at=None, finished_at=None, error=None)
    store_completed(db, record, scanned)
    fold_pending(db, "alice")


def tick(after: float) -> float:
    """A time after `after` by the clock the fold reads."""
    while time.time() <= after:
        time.sleep(0.001)
    return time.time()


@contextlib.contextmanager
def built_inventory(url: str) -> Iterator[Inventory]:
    """Alice's inventory after the two scans, in a fresh database at `url`."""
    db = Database(create_db_engine(url))
    try:
        upgrade_schema(db.engine)
        fold_scan(db, "t-versions", ScanKind.CUSTOM, ["-sT", "-sV", "-p", "22,80"], VERSION_SCAN)
        between = tick(time.time())
        tick(between)
        fold_scan(db, "t-quick", ScanKind.QUICK, ["-sT", "-T4", "--top-ports", "100"], QUICK_SCAN)
        yield Inventory(InventoryStore(db), db, between)
    finally:
        db.close()


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shared(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Inventory]:
    """The inventory the read-only tests of this module share (built once per database: a
    PostgreSQL database made and migrated for each of the ~90 cases took 37 s)."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('inventory') / 'tasks.db'}"
        else:
            name = stack.enter_context(scratch_database())
            url = make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
        yield stack.enter_context(built_inventory(url))


@pytest.fixture
def inventory(database_url: str) -> Iterator[Inventory]:
    """An inventory of its own, for a test that changes it."""
    with built_inventory(database_url) as built:
        yield built


def query(inventory: Inventory, filters: dict[str, Any]) -> HostQuery:
    """The filters as scans.py makes them: 'between' stands for the time between the scans."""
    values = {key: inventory.between if value == "between" else value for key, value in filters.items()}
    if "network" in values:
        values["network"] = parse_network(values["network"])
    return HostQuery(**values)


OPEN, CLOSED, FILTERED, MAYBE = "open", "closed", "filtered", "open|filtered"
ONE_OPEN = {(22, OPEN), (80, OPEN), (443, OPEN)}
FIND_HOSTS: list[tuple[dict[str, Any], dict[str, set[tuple[int, str]]]]] = [
    ({}, {ONE: ONE_OPEN, TWO: {(22, OPEN)}, THREE: set(), FOUR: {(5000, OPEN)}, FIVE: {(8080, OPEN)}}),
    ({"state": "any"}, {ONE: ONE_OPEN, TWO: {(22, OPEN), (53, MAYBE)}, THREE: {(3389, FILTERED)},
                        FOUR: {(5000, OPEN), (6000, CLOSED)}, FIVE: {(8080, OPEN)}}),
    ({"state": "open"}, {ONE: ONE_OPEN, TWO: {(22, OPEN)}, FOUR: {(5000, OPEN)}, FIVE: {(8080, OPEN)}}),
    ({"state": "closed"}, {FOUR: {(6000, CLOSED)}}),
    ({"state": "filtered"}, {THREE: {(3389, FILTERED)}}),
    ({"state": "open|filtered"}, {TWO: {(53, MAYBE)}}),
    ({"port": 22}, {ONE: {(22, OPEN)}, TWO: {(22, OPEN)}}),
    ({"protocol": "udp"}, {}),
    ({"protocol": "udp", "state": "any"}, {TWO: {(53, MAYBE)}}),
    ({"service": "ssh"}, {ONE: {(22, OPEN)}, TWO: {(22, OPEN)}}),
    ({"service": "http"}, {ONE: {(80, OPEN)}, FOUR: {(5000, OPEN)}}),
    ({"service": "upnp"}, {}),
    ({"product": "openssh"}, {ONE: {(22, OPEN)}, TWO: {(22, OPEN)}}),
    ({"product": "NGINX"}, {ONE: {(80, OPEN)}}),
    ({"version_prefix": "7."}, {TWO: {(22, OPEN)}}),
    ({"version_prefix": "9.2P"}, {ONE: {(22, OPEN)}}),
    ({"version_prefix": "%"}, {}),
    ({"cpe": "cpe:/a:openbsd:openssh"}, {ONE: {(22, OPEN)}, TWO: {(22, OPEN)}}),
    ({"cpe": "IGOR_SYSOEV"}, {ONE: {(80, OPEN)}}),
    ({"script": "banner"}, {ONE: {(22, OPEN)}}),
    ({"script": "BANNER"}, {ONE: {(22, OPEN)}}),
    ({"network": "127.51.7.4/31"}, {FOUR: {(5000, OPEN)}, FIVE: {(8080, OPEN)}}),
    ({"seen_since": "between"}, {ONE: ONE_OPEN, THREE: set(), FOUR: {(5000, OPEN)},
                                 FIVE: {(8080, OPEN)}}),
    ({"changed_since": "between"}, {ONE: {(443, OPEN)}, TWO: {(22, OPEN)}, FIVE: {(8080, OPEN)}}),
    ({"changed_since": "between", "state": "any"}, {ONE: {(443, OPEN)}, TWO: {(22, OPEN), (53, MAYBE)},
                                                    FOUR: {(6000, CLOSED)}, FIVE: {(8080, OPEN)}}),
    ({"changed_since": "between", "state": "open"}, {ONE: {(443, OPEN)}, TWO: {(22, OPEN)}, FIVE: {(8080, OPEN)}}),
    ({"changed_since": "between", "state": "closed"}, {FOUR: {(6000, CLOSED)}}),
    ({"changed_since": "between", "state": "filtered"}, {}),
    ({"changed_since": "between", "port": 22}, {TWO: {(22, OPEN)}}),
    ({"changed_since": "between", "product": "OpenSSH"}, {TWO: {(22, OPEN)}}),
    ({"changed_since": "between", "network": "127.51.7.0/30"}, {ONE: {(443, OPEN)}, TWO: {(22, OPEN)}}),
    ({"changed_since": "between", "seen_since": "between", "state": "any"}, {ONE: {(443, OPEN)}, FOUR: {(6000, CLOSED)},
                                                                             FIVE: {(8080, OPEN)}}),
]


@pytest.mark.parametrize(("filters", "expected"), FIND_HOSTS, ids=[str(f) for f, _ in FIND_HOSTS])
async def test_find_hosts(shared: Inventory, filters: dict[str, Any], expected: dict[str, set]) -> None:
    hosts, total = await shared.store.find_hosts("alice", query(shared, filters), 100, 0)
    assert {h.address: {(p.port, p.state) for p in h.ports} for h in hosts} == expected
    assert [h.address for h in hosts] == sorted(expected, key=ipaddress.ip_address) and total == len(expected)


async def test_find_hosts_pages_in_address_order(shared: Inventory) -> None:
    pages = [await shared.store.find_hosts("alice", HostQuery(state="any"), 2, offset)
             for offset in (0, 2, 4)]
    assert [[h.address for h in hosts] for hosts, _ in pages] == [[ONE, TWO], [THREE, FOUR], [FIVE]]
    assert {total for _, total in pages} == {5}


async def test_what_a_version_scan_found_is_kept_with_when_and_by_which_task(shared: Inventory) -> None:
    [one], _ = await shared.store.find_hosts("alice", query(shared, {"network": ONE}), 10, 0)
    ssh = next(p for p in one.ports if p.port == 22)
    text = text_of(ssh)
    assert (ssh.service, text.product, text.version, text.extrainfo) == ("ssh", "OpenSSH", "9.2p1", "protocol 2.0")
    assert text.cpe == ["cpe:/a:openbsd:openssh:9.2p1"] and ssh.scripts == ["banner"]
    assert (ssh.version_task_id, ssh.scripts_task_id, ssh.last_task_id) == ("t-versions", "t-versions", "t-quick")
    assert ssh.version_confirmed_at is not None and ssh.version_confirmed_at < shared.between < ssh.last_seen
    assert (one.os, one.os_task_id) == ("Linux 5.0 - 5.14", "t-versions") and one.changed_at < shared.between
    [five], _ = await shared.store.find_hosts("alice", query(shared, {"network": FIVE}), 10, 0)
    assert (five.ports[0].version_confirmed_at, five.ports[0].version_task_id, five.os_task_id) == (None, None, None)


TOP_VALUES: list[tuple[str, dict[str, Any], list[tuple[str, int]]]] = [
    ("port", {}, [("22/tcp", 2), ("80/tcp", 1), ("443/tcp", 1), ("5000/tcp", 1), ("8080/tcp", 1)]),
    ("service", {}, [("http", 2), ("ssh", 2), ("http-proxy", 1), ("https", 1)]),
    # Ties in code point order: 'Werkzeug' before 'nginx', whatever the database's locale.
    ("product", {}, [("OpenSSH", 2), ("Werkzeug httpd", 1), ("nginx", 1)]),
    ("version", {}, [("OpenSSH 7.4", 1), ("OpenSSH 9.2p1", 1), ("Werkzeug httpd 2.2.2", 1), ("nginx 1.18.0", 1)]),
    ("os", {}, [("Linux 5.0 - 5.14", 1)]),
    ("status", {}, [("up", 4), ("down", 1)]),
    ("port", {"network": "127.51.7.0/30"}, [("22/tcp", 2), ("80/tcp", 1), ("443/tcp", 1)]),
    ("service", {"network": "127.51.7.0/30"}, [("ssh", 2), ("http", 1), ("https", 1)]),
    ("product", {"network": "127.51.7.0/30"}, [("OpenSSH", 2), ("nginx", 1)]),
    ("version", {"network": "127.51.7.4/30"}, [("Werkzeug httpd 2.2.2", 1)]),
    ("os", {"network": "127.51.7.2/31"}, []),
    ("status", {"network": "127.51.7.0/30"}, [("up", 2), ("down", 1)]),
    ("port", {"seen_since": "between"}, [("22/tcp", 1), ("80/tcp", 1), ("443/tcp", 1), ("5000/tcp", 1),
                                         ("8080/tcp", 1)]),
    ("product", {"seen_since": "between"}, [("OpenSSH", 1), ("Werkzeug httpd", 1), ("nginx", 1)]),
    ("status", {"seen_since": "between"}, [("up", 4)]),
]


@pytest.mark.parametrize(("field", "filters", "expected"), TOP_VALUES,
                         ids=[f"{field}-{filters}" for field, filters, _ in TOP_VALUES])
async def test_top_values(shared: Inventory, field: str, filters: dict[str, Any],
                          expected: list[tuple[str, int]]) -> None:
    counted = await shared.store.top_values("alice", field, query(shared, filters), 20)
    assert [(named(value), value.hosts) for value in counted] == expected
    [first] = await shared.store.top_values("alice", field, query(shared, filters), 1) or [None]
    assert ([(named(first), first.hosts)] if first else []) == expected[:1]


def named(value: ValueCount) -> str:
    """A counted value as one string: the target's product and version joined, else nmap's."""
    if value.untrusted is None:
        return str(value.value)
    return " ".join(part for part in (value.untrusted.product, value.untrusted.version) if part)


def text_of(port: InventoryPort) -> InventoryText:
    return port.untrusted or InventoryText()


async def test_only_a_look_that_found_something_else_is_a_change(inventory: Inventory) -> None:
    """A third scan of .1 with -sV and -O: another SSH version, nothing identified on port
    80, another OS, no script output. What it looked at changes (and that is a change);
    the scripts, which it reported none of, stay."""
    again = tick(inventory.between)
    fold_scan(inventory.db, "t-again", ScanKind.CUSTOM, ["-sS", "-sV", "-O"], result(
        host(ONE, port(22, "open", "ssh", "OpenSSH", "9.6p1"), port(80, "open", "http"), port(443, "open", "https"),
             os="Linux 6.1")), target=ONE)
    [one], _ = await inventory.store.find_hosts("alice", query(inventory, {"network": ONE}), 10, 0)
    ports = {p.port: p for p in one.ports}
    assert (one.os, one.os_task_id) == ("Linux 6.1", "t-again") and one.changed_at >= again
    assert (text_of(ports[22]).version, ports[22].scripts, ports[22].scripts_task_id) == (
        "9.6p1", ["banner"], "t-versions")
    assert (text_of(ports[80]).product, ports[80].version_task_id) == ("", "t-again")
    assert ports[22].changed_at >= again and ports[80].changed_at >= again
    assert ports[443].changed_at < again and ports[443].version_task_id == "t-again", "a first look is no change"


async def test_known_ports_are_read_in_batches_of_consecutive_addresses(
        inventory: Inventory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scan of .1, .3 and .5 that lists no port of them, its known ports read two
    addresses at a time: the batch .1-.3 spans .2, whose ports stay as they were, and each
    scanned host's known ports, in whichever batch, take its unlisted state (closed)."""
    monkeypatch.setattr(inventory_store, "_CHUNK", 2)
    record = TaskRecord(id="t-batches", owner="alice", kind=ScanKind.QUICK, target=ONE,
                        argv=["nmap", "-sT", "-n", "-oX", "-", "--", ONE, THREE, FIVE], status=TaskStatus.COMPLETED,
                        time_limit=60, created_at=time.time(), started_at=None, finished_at=None, error=None)
    store_completed(inventory.db, record, result(host(ONE), host(THREE), host(FIVE)))
    fold_pending(inventory.db, "alice")
    hosts, _ = await inventory.store.find_hosts("alice", HostQuery(state="any"), 10, 0)
    states = {(h.address, p.port): (p.state, p.last_task_id) for h in hosts for p in h.ports}
    assert states == {
        (ONE, 22): (CLOSED, "t-batches"), (ONE, 80): (CLOSED, "t-batches"), (ONE, 443): (CLOSED, "t-batches"),
        (TWO, 22): (OPEN, "t-versions"), (TWO, 53): (MAYBE, "t-versions"), (THREE, 3389): (CLOSED, "t-batches"),
        (FOUR, 5000): (OPEN, "t-quick"), (FOUR, 6000): (CLOSED, "t-quick"), (FIVE, 8080): (CLOSED, "t-batches")}
