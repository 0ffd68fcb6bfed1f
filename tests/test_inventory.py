"""The inventory across scans: pure planning on recorded results, then find_hosts and
top_values over several real scans through in-memory clients of create_server(...) (the
in_memory fixture), ports opened and closed between them."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import pytest
from fastmcp import Client

from inventory import InventoryQueryError, address_key, parse_since, plan_update, port_set
from nmap_report import parse_report
from tests.conftest import OpenClient
from tests.support import Listeners, answer_of, call, error_text, free_port

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
    scope = [ipaddress.ip_network("127.0.0.0/28")]
    planned = plan_update("alice", "t1", first, scope, {}, {}, 100.0)
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
    again = plan_update("alice", "t2", second, scope, hosts, known_ports, 200.0)
    ports = rows_by_key(again.ports, "address", "protocol", "port")
    assert ports[port_key]["state"] == "closed" and ports[port_key]["changed_at"] == 200.0
    assert ports[port_key]["first_seen"] == 100.0
    changed = rows_by_key(again.hosts, "address")
    assert changed[gone]["status"] == "down" and changed[gone]["changed_at"] == 200.0
    assert changed[listening]["status"] == "up" and changed[listening]["changed_at"] == 100.0
    outside = plan_update("alice", "t3", second, [ipaddress.ip_network("127.9.0.0/24")], hosts, {}, 300.0)
    assert gone not in rows_by_key(outside.hosts, "address"), "only a scan of its network can mark it down"


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


async def test_find_hosts_pages_under_the_size_cap(in_memory: OpenClient, listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    async with in_memory(max_answer_bytes=8000) as alice:
        await scan(alice, f"-Pn -p {port} 127.0.1.0/26")
        page = await answer_of(alice, "find_hosts", network="127.0.1.0/26", state="any", limit=1000)
        assert 0 < page["page"]["returned"] < 64 and page["truncated"] and page["page"]["total"] == 64
        assert f"pass offset {page['page']['next_offset']}" in page["message"]
        rest = await answer_of(alice, "find_hosts", network="127.0.1.0/26", state="any", limit=1000,
                               offset=page["page"]["next_offset"])
    assert rest["hosts"][0]["address"] != page["hosts"][-1]["address"]
