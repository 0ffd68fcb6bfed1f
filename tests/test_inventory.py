"""The inventory across scans: pure planning on recorded results, then find_hosts and
top_values over several real scans through in-memory clients of create_server(...) (the
in_memory fixture), ports opened and closed between them, on SQLite and PostgreSQL: what a
version scan found outlives a quick scan, -Pn adds no address that never answered, and a
host that went down is among what changed."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastmcp import Client

from inventory import (
    InventoryQueryError,
    Scope,
    address_key,
    looks_at_versions,
    parse_since,
    plan_update,
    port_set,
    scope_of,
)
from models import ExtraPorts, HostDetail, PortDetail, ScanKind, ScannedPorts, ScanResult
from nmap_report import parse_report
from tests.conftest import OpenClient
from tests.namespaces import FirewalledHost, firewalled_host
from tests.support import BannerServer, Listeners, answer_of, call, error_text, free_port, top_ports

pytestmark = pytest.mark.anyio
FIXTURES = Path(__file__).parent / "fixtures"


def test_address_keys_sort_like_addresses_within_a_family() -> None:
    addresses = ["10.0.0.2", "10.0.0.10", "9.255.255.255", "10.0.1.0"]
    assert sorted(addresses, key=address_key) == sorted(addresses, key=ipaddress.ip_address)
    assert address_key("::1") == "6" + "0" * 31 + "1" and len(address_key("1.2.3.4")) == 9


def test_since_takes_durations_and_iso_dates() -> None:
    now = 1_800_000_000.0
    assert parse_since("7d", now) == now - 7 * 86_400 and parse_since("90m", now) == now - 5400
    assert parse_since("2026-11-24", now) == 1795478400.0
    with pytest.raises(InventoryQueryError, match="neither a duration"):
        parse_since("last tuesday", now)


def test_port_lists_of_scaninfo() -> None:
    assert port_set("1-3,80,8000-8001") == {1, 2, 3, 80, 8000, 8001}


def rows_by_key(rows: list[dict], *key: str) -> dict:
    return {tuple(row[k] for k in key) if len(key) > 1 else row[key[0]]: row for row in rows}


def test_a_later_scan_of_the_same_scope_records_what_closed_and_went_down() -> None:
    first = parse_report((FIXTURES / "multi_host.xml").read_bytes(), "127.0.0.1-8")
    scope = Scope([ipaddress.ip_network("127.0.0.0/28")], [])
    planned = plan_update("alice", "t1", first, scope, {}, {}, 100.0, versions=False)
    hosts = rows_by_key(planned.hosts, "address")
    assert len(hosts) == len([h for h in first.hosts if h.status == "up"]) and all(
        h["first_seen"] == h["changed_at"] == 100.0 for h in hosts.values())
    [(port_key, open_port)] = [(k, r) for k, r in rows_by_key(planned.ports, "address", "protocol", "port").items()
                               if r["state"] == "open"]
    # A real loopback scan never finds a host down: the second scan is the first without the
    # listening host's open port, and without one host at all.
    listening = port_key[0]
    gone = next(h.address for h in first.hosts if h.address != listening)
    second = first.model_copy(update={"hosts": [
        h.model_copy(update={"ports": []}) if h.address == listening else h
        for h in first.hosts if h.address != gone]})
    known_ports = {port_key: open_port}
    again = plan_update("alice", "t2", second, scope, hosts, known_ports, 200.0, versions=False)
    ports = rows_by_key(again.ports, "address", "protocol", "port")
    assert ports[port_key]["state"] == "closed" and ports[port_key]["changed_at"] == 200.0
    assert ports[port_key]["first_seen"] == 100.0
    changed = rows_by_key(again.hosts, "address")
    assert changed[gone]["status"] == "down" and changed[gone]["changed_at"] == 200.0
    assert changed[listening]["status"] == "up" and changed[listening]["changed_at"] == 100.0
    outside = plan_update("alice", "t3", second, Scope([ipaddress.ip_network("127.9.0.0/24")], []), hosts, {}, 300.0,
                          versions=False)
    assert gone not in rows_by_key(outside.hosts, "address"), "only a scan of its network can mark it down"
    skipped = plan_update("alice", "t4", second, scope_of(["nmap", "--exclude", f"127.0.0.9,{gone}", "--",
                                                           "127.0.0.0/28"]), hosts, {}, 400.0, versions=False)
    assert gone not in rows_by_key(skipped.hosts, "address"), "nor one that was told to skip it"


def test_a_host_nmap_gave_up_on_keeps_the_ports_it_did_not_list() -> None:
    """A host that timed out (--host-timeout) is up with no ports listed: they were not
    looked at, so a port known open stays open rather than taking the unlisted state."""
    timed_out = parse_report((FIXTURES / "host_timeout.xml").read_bytes(), "127.0.0.1")
    [host] = timed_out.hosts
    assert host.timed_out and host.ports == [] and timed_out.scanned[0].services == "1-2000"
    scope = scope_of(["nmap", "--", host.address])
    ssh = PortDetail(port=22, protocol="tcp", state="open", service="ssh", version="")
    answered = host.model_copy(update={"timed_out": False, "ports": [ssh]})
    known = plan_update("alice", "t1", timed_out.model_copy(update={"hosts": [answered]}), scope, {}, {}, 100.0,
                        versions=False)
    hosts = rows_by_key(known.hosts, "address")
    again = plan_update("alice", "t2", timed_out, scope, hosts, rows_by_key(known.ports, "address", "protocol", "port"),
                        200.0, versions=False)
    assert again.ports == [] and [h["status"] for h in again.hosts] == ["up"]


def swept(*hosts: HostDetail) -> ScanResult:
    """A scan of 127.0.0.0/29, TCP ports 22 and 80 (no UDP), that found `hosts` up."""
    return ScanResult(target="127.0.0.0/29", scan_time=1.0, hosts_up=len(hosts), hosts_down=8 - len(hosts),
                      hosts_total=8, open_ports=0, hosts=list(hosts), exit_status="success",
                      scanned=[ScannedPorts(protocol="tcp", services="22,80")])


def up_host(address: str, unlisted: str, *ports: PortDetail) -> HostDetail:
    return HostDetail(address=address, status="up", hostnames=[], ports=list(ports), reason="syn-ack",
                      extraports=[ExtraPorts(state=unlisted, count=98)])


def test_each_host_s_unlisted_known_ports_take_its_own_unlisted_state() -> None:
    """Several hosts at once: a known port is matched to its own host only (the fold looks
    them up by address), scanned but not listed it takes that host's unlisted state, and
    the ports of a host not found up, or of a protocol not scanned, are left as they were."""
    one, two, three = "127.0.0.1", "127.0.0.2", "127.0.0.3"
    ssh, http = (PortDetail(port=n, protocol="tcp", state="open", service=s) for n, s in ((22, "ssh"), (80, "http")))
    dns = PortDetail(port=53, protocol="udp", state="open", service="domain")
    scope = Scope([ipaddress.ip_network("127.0.0.0/29")], [])
    first = plan_update("alice", "t1", swept(up_host(one, "closed", ssh, http, dns), up_host(two, "closed", ssh, http),
                                             up_host(three, "closed", ssh)), scope, {}, {}, 100.0, versions=False)
    known_ports = rows_by_key(first.ports, "address", "protocol", "port")
    again = plan_update("alice", "t2", swept(up_host(one, "filtered"), up_host(two, "closed", ssh)), scope,
                        rows_by_key(first.hosts, "address"), known_ports, 200.0, versions=False)
    ports = {key: (row["state"], row["changed_at"]) for key, row in
             rows_by_key(again.ports, "address", "protocol", "port").items()}
    assert ports == {(one, "tcp", 22): ("filtered", 200.0), (one, "tcp", 80): ("filtered", 200.0),
                     (two, "tcp", 22): ("open", 100.0), (two, "tcp", 80): ("closed", 200.0)}
    assert {row["address"]: row["status"] for row in again.hosts} == {one: "up", two: "up", three: "down"}


async def scan(client: Client, command: str) -> dict:
    answer = await answer_of(client, "custom_scan", command=command, timeout=60)
    assert answer["status"] == "completed", answer
    return answer


async def test_find_hosts_and_top_values_over_several_real_scans(in_memory: OpenClient, listeners: Listeners) -> None:
    a, b = free_port("127.0.0.2"), free_port("127.0.0.2")
    assert a != b and listeners.open(a, "127.0.0.2") and listeners.open(b, "127.0.0.2")
    c = free_port("127.0.0.5")
    async with in_memory() as alice, in_memory("bob") as bob:
        before = time.time()
        first = await scan(alice, f"-p {a},{b},{c} 127.0.0.2 127.0.0.5")
        with_a = await answer_of(alice, "find_hosts", port=a)
        assert [h["address"] for h in with_a["hosts"]] == ["127.0.0.2"]
        [port] = with_a["hosts"][0]["ports"]
        assert (port["port"], port["state"], port["last_task_id"]) == (a, "open", first["task_id"])
        listeners.close(b)
        assert listeners.open(c, "127.0.0.5")
        second = await scan(alice, f"-p {a},{b},{c} 127.0.0.2 127.0.0.5")
        closed = await answer_of(alice, "find_hosts", port=b, state="any", network="127.0.0.2")
        [host] = closed["hosts"]
        [port_b] = host["ports"]
        assert port_b["state"] == "closed" and port_b["last_task_id"] == second["task_id"]
        assert port_b["changed_at"] > port_b["first_seen"] >= before
        assert (await answer_of(alice, "find_hosts", port=b))["hosts"] == [], "open is the default state"
        on_five = await answer_of(alice, "find_hosts", network="127.0.0.5/32")
        assert [p["port"] for h in on_five["hosts"] for p in h["ports"]] == [c]
        changed = await answer_of(alice, "find_hosts", network="127.0.0.0/24", changed_since="1h", state="any")
        assert {(h["address"], p["port"], p["state"]) for h in changed["hosts"] for p in h["ports"]} >= {
            ("127.0.0.2", a, "open"), ("127.0.0.2", b, "closed"), ("127.0.0.5", c, "open")}
        tops = await answer_of(alice, "top_values", field="port", network="127.0.0.0/24")
        counts = {v["value"]: v["hosts"] for v in tops["values"]}
        assert counts[f"{a}/tcp"] == 1 and counts[f"{c}/tcp"] == 1 and f"{b}/tcp" not in counts
        status = await answer_of(alice, "top_values", field="status")
        assert status["values"] == [{"value": "up", "hosts": 2}]
        assert (await answer_of(bob, "find_hosts"))["hosts"] == [], "a token sees only its own inventory"
        refused = await call(alice, "find_hosts", {"network": "not-a-net"})
        assert error_text(refused).startswith("invalid_argument: network 'not-a-net' is not an address")
    assert json.dumps(with_a).count("alice") == 0


async def test_find_hosts_pages_under_the_size_cap(in_memory: OpenClient) -> None:
    async with in_memory(max_answer_bytes=8000) as alice:
        # nmap finds every loopback address up (localhost-response), each with the port closed.
        await scan(alice, f"-p {free_port()} 127.51.1.0/26")
        page = await answer_of(alice, "find_hosts", network="127.51.1.0/26", state="any", limit=1000)
        assert 0 < page["page"]["returned"] < 64 and page["truncated"] and page["page"]["total"] == 64
        assert f"pass offset {page['page']['next_offset']}" in page["message"]
        rest = await answer_of(alice, "find_hosts", network="127.51.1.0/26", state="any", limit=1000,
                               offset=page["page"]["next_offset"])
    assert rest["hosts"][0]["address"] != page["hosts"][-1]["address"]


def moment(at: float) -> str:
    """A time as find_hosts' changed_since takes it."""
    return datetime.fromtimestamp(at, UTC).isoformat()


def ports_of(page: dict) -> dict[str, set[tuple[int, str]]]:
    return {h["address"]: {(p["port"], p["state"]) for p in h["ports"]} for h in page["hosts"]}


def test_only_version_detection_is_read_from_the_argv() -> None:
    argv = ["nmap", "-sT", "-n", "-oX", "-", "--"]
    assert looks_at_versions(ScanKind.FULL, [*argv, "127.0.0.1"]), "full_scan's second phase is a version scan"
    assert not looks_at_versions(ScanKind.QUICK, [*argv, "127.0.0.1"])
    assert looks_at_versions(ScanKind.CUSTOM, ["nmap", "-sT", "-sV", "--", "127.0.0.1"])
    assert not looks_at_versions(ScanKind.CUSTOM, ["nmap", "-sT", "--script=(banner) and not (x)", "--", "-sV"])


@pytest.fixture
def banner_on_a_top_port() -> Iterator[BannerServer]:
    """An SSH banner on 127.51.2.1, on one of nmap's top 100 ports (quick_scan scans those)."""
    for port in (p for p in top_ports(100) if 1024 <= p < 32768):
        with contextlib.suppress(OSError):
            server = BannerServer("127.51.2.1", port)
            break
    else:
        raise RuntimeError("none of nmap's top 100 ports is free on 127.51.2.1")
    yield server
    server.stop()


async def test_a_quick_scan_leaves_what_a_version_scan_found(
    in_memory: OpenClient, database_url: str, banner_on_a_top_port: BannerServer
) -> None:
    port = banner_on_a_top_port.port
    async with in_memory(database_url=database_url) as alice:
        versions = await scan(alice, f"-sV -p {port} 127.51.2.1")
        full = await answer_of(alice, "get_task_result", task_id=versions["task_id"], view="full")
        [found] = full["result"]["hosts"][0]["ports"]
        seen = found["untrusted"]
        assert (found["service"], seen["product"]) == ("ssh", "OpenSSH"), found
        between = time.time()
        quick = await answer_of(alice, "quick_scan", target="127.51.2.1", timeout=60)
        assert quick["status"] == "completed" and [(p["state"], p.get("untrusted")) for p in
                                                   quick["result"]["hosts"][0]["ports"] if p["port"] == port] == [
            ("open", None)]
        [host] = (await answer_of(alice, "find_hosts", product="openssh"))["hosts"]
        [kept] = host["ports"]
        assert (kept["service"], kept["untrusted"]) == ("ssh", {key: seen[key] for key in kept["untrusted"]})
        assert set(kept["untrusted"]) == {"product", "version", "extrainfo", "cpe"} and seen["cpe"]
        assert (kept["version_task_id"], kept["last_task_id"]) == (versions["task_id"], quick["task_id"])
        assert kept["version_confirmed_at"] < between < kept["last_seen"]
        products = await answer_of(alice, "top_values", field="product")
        assert products["values"] == [{"hosts": 1, "untrusted": {"product": "OpenSSH"}}]
        named = await answer_of(alice, "top_values", field="version")
        assert named["values"] == [{"hosts": 1, "untrusted": {"product": "OpenSSH", "version": seen["version"]}}]
        changed = await answer_of(alice, "find_hosts", changed_since=moment(between), port=port, state="any")
        assert changed["hosts"] == [], "nothing changed: the quick scan did not look at versions"


async def test_a_scan_without_host_discovery_keeps_only_the_addresses_that_answered(
    in_memory: OpenClient, database_url: str, listeners: Listeners
) -> None:
    first, ninth = "127.51.3.1", "127.51.3.9"
    a, b = free_port(first), free_port(ninth)
    while b == a:
        b = free_port(ninth)
    assert listeners.open(a, first) and listeners.open(b, ninth)
    async with in_memory(database_url=database_url) as alice:
        swept = await scan(alice, f"-Pn -p {a},{b} 127.51.3.0/28")
        assert swept["result"]["hosts_up"] == 16, "-Pn: nmap calls every address up"
        everything = await answer_of(alice, "find_hosts", network="127.51.3.0/28", state="any")
        assert ports_of(everything) == {first: {(a, "open"), (b, "closed")}, ninth: {(a, "closed"), (b, "open")}}
        closed = await answer_of(alice, "find_hosts", state="closed")
        assert [h["address"] for h in closed["hosts"]] == [first, ninth]
        assert (await answer_of(alice, "top_values", field="status"))["values"] == [{"value": "up", "hosts": 2}]
        listeners.close(b)
        await scan(alice, f"-Pn -p {a},{b} 127.51.3.0/28")
        again = await answer_of(alice, "find_hosts", network="127.51.3.0/28", state="any")
    assert ports_of(again) == {first: {(a, "open"), (b, "closed")}, ninth: {(a, "closed"), (b, "closed")}}, \
        "a known host that showed no open port is still recorded"
    assert [h["status"] for h in again["hosts"]] == ["up", "up"]


@pytest.fixture
def host_in_namespace(tmp_path: Path) -> Iterator[FirewalledHost]:
    with firewalled_host(tmp_path) as host:
        yield host


@pytest.mark.requires_root("a network namespace (ip netns) for a host that goes down")
async def test_a_host_that_went_down_is_among_what_changed(
    in_memory: OpenClient, database_url: str, host_in_namespace: FirewalledHost
) -> None:
    address, port = host_in_namespace.address, host_in_namespace.port
    async with in_memory(database_url=database_url, nmap_path=str(host_in_namespace.nmap)) as alice:
        up = await scan(alice, f"-p {port} {address}")
        assert [(h["status"], len(h["ports"])) for h in up["result"]["hosts"]] == [("up", 1)]
        between = time.time()
        host_in_namespace.drop()  # everything: nmap's pings go unanswered, as a host gone away
        down = await scan(alice, f"-p {port} {address}")
        assert down["result"]["hosts_down"] == 1
        diff = await answer_of(alice, "diff_scans", task_a=up["task_id"], task_b=down["task_id"])
        changed = await answer_of(alice, "find_hosts", changed_since=moment(between), state="any")
        since = await answer_of(alice, "find_hosts", changed_since=moment(between))
    assert diff["hosts_went_down"] == [address]
    [host] = changed["hosts"]
    assert (host["address"], host["status"], host["last_task_id"]) == (address, "down", down["task_id"])
    assert host["changed_at"] > between and ports_of(changed) == {address: {(port, "open")}}, \
        "a host that went down shows the ports it had"
    assert [h["address"] for h in since["hosts"]] == [address]
