"""Results through in-memory clients of create_server(...) (the in_memory fixture): progress,
partial results, formats and diffs of real nmap runs on loopback. Results over real HTTP
(progress notifications, the byte cap on the wire) are in test_results_live.py."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from typing import Any

import pytest
from fastmcp import Client

from nmap_report import parse_report
from tests.conftest import OpenClient
from tests.support import Listeners, NmapWrapper, answer_of, call, error_text, running_task

pytestmark = pytest.mark.anyio
# About 6 s: nmap reports its progress every 2 s.
SLOW_SCAN = "-p 1-300 --scan-delay 20ms 127.0.0.1"


async def test_progress_rises_while_a_slow_scan_runs_then_it_completes(
    in_memory: OpenClient, nmap_wrapper: NmapWrapper
) -> None:
    async with in_memory() as alice:
        waiting = asyncio.create_task(call(alice, "custom_scan", {"command": SLOW_SCAN, "timeout": 60}))
        task_id = await running_task(alice, nmap_wrapper)
        percents = []
        while (status := await answer_of(alice, "get_task_status", task_id=task_id))["status"] == "running":
            if status["progress"]:
                assert status["progress"]["phase"] == "Connect Scan"
                percents.append(status["progress"]["percent"])
            await asyncio.sleep(0.2)
        waited = (await waiting).structured_content
    assert status["status"] == "completed" and status["progress"] is None
    assert len(set(percents)) >= 2 and percents == sorted(percents) and 0 < percents[-1] < 100
    assert waited["task_id"] == task_id and waited["status"] == "completed", "the waiting call got the result"


def hosts_of(answer: dict[str, Any]) -> list[dict[str, Any]]:
    """The hosts of an answer's result; none before nmap has finished one."""
    return answer["result"]["hosts"] if answer["result"] else []


async def test_partial_results_while_running_and_after_cancel(
    in_memory: OpenClient, listeners: Listeners, nmap_wrapper: NmapWrapper
) -> None:
    listeners.open(21000, "127.0.0.2")
    command = "-p 1-100,21000 --scan-delay 10ms --max-hostgroup 1 127.0.0.1-8"
    async with in_memory() as alice:
        waiting = asyncio.create_task(call(alice, "custom_scan", {"command": command, "timeout": 60}))
        task_id = await running_task(alice, nmap_wrapper)
        while len(hosts_of(running := await answer_of(alice, "get_task_result", task_id=task_id))) < 2:
            await asyncio.sleep(0.1)
        assert running["status"] == "running" and running["result"]["partial"] is True
        done_so_far = [h["address"] for h in running["result"]["hosts"]]
        assert done_so_far[:2] == ["127.0.0.1", "127.0.0.2"] and len(done_so_far) < 8
        assert [(p["port"], p["state"]) for p in running["result"]["hosts"][1]["ports"]] == [(21000, "open")]
        cancelled = await answer_of(alice, "cancel_task", task_id=task_id)
        assert cancelled["status"] == "cancelled"
        kept = await answer_of(alice, "get_task_result", task_id=task_id, view="full")
        await waiting
    assert kept["status"] == "cancelled" and kept["result"]["partial"] is True
    assert [h["address"] for h in kept["result"]["hosts"]][: len(done_so_far)] == done_so_far


async def test_diff_between_two_real_scans(in_memory: OpenClient, listeners: Listeners) -> None:
    first_port, kept_port, later_port = 21001, 21002, 21003
    for port in (first_port, kept_port):
        assert listeners.open(port)
    command = f"-p {first_port},{kept_port},{later_port} 127.0.0.1"
    async with in_memory() as alice:
        before = await answer_of(alice, "custom_scan", command=command)
        listeners.close(first_port)
        assert listeners.open(later_port)
        after = await answer_of(alice, "custom_scan", command=command)
        diff = await answer_of(alice, "diff_scans", task_a=before["task_id"], task_b=after["task_id"])
    assert [(c["port"], c["before"], c["after"]) for c in diff["ports_opened"]] == [(later_port, "", "open")]
    assert [(c["port"], c["before"], c["after"]) for c in diff["ports_closed"]] == [(first_port, "open", "")]
    assert diff["unchanged_open_ports"] == 1 and diff["hosts_came_up"] == diff["hosts_went_down"] == []


async def test_diff_needs_two_finished_scans_of_your_own(in_memory: OpenClient, nmap_wrapper: NmapWrapper) -> None:
    async with in_memory() as alice, in_memory("bob") as bob:
        done = await answer_of(alice, "quick_scan", target="127.0.0.1")
        nmap_wrapper.set_delay(60)
        waiting = asyncio.create_task(call(alice, "custom_scan", {"command": "-p 1 127.0.0.1", "timeout": 60}))
        unfinished = await running_task(alice, nmap_wrapper)
        refused = await call(alice, "diff_scans", {"task_a": done["task_id"], "task_b": unfinished})
        assert error_text(refused) == f"not_comparable: task {unfinished} has no result to compare (it is running)"
        foreign = await call(bob, "diff_scans", {"task_a": done["task_id"], "task_b": done["task_id"]})
        assert error_text(foreign).startswith("not_found: ")
        await answer_of(alice, "cancel_task", task_id=unfinished)
        await waiting


async def test_xml_and_csv_formats_of_a_finished_scan(in_memory: OpenClient, listeners: Listeners) -> None:
    [port] = listeners.open_free_top_ports(1)
    async with in_memory() as alice:
        scan = await answer_of(alice, "custom_scan", command=f"-sV -p {port},1 127.0.0.1-3")
        full = await answer_of(alice, "get_task_result", task_id=scan["task_id"], view="full")
        xml = await answer_of(alice, "get_task_result", task_id=scan["task_id"], format="xml")
        table = await answer_of(alice, "get_task_result", task_id=scan["task_id"], format="csv")
    assert xml["format"] == "xml" and xml["content"].startswith("<?xml") and xml["result"] is None
    assert json.loads(parse_report(xml["content"], full["target"]).model_dump_json()) == full["result"] | {
        "warnings": full["result"]["warnings"]}
    lines = table["content"].splitlines()
    assert lines[0] == ("address,hostname,port,protocol,state,service,untrusted_product,untrusted_version,"
                        "untrusted_extrainfo,suspicious")
    assert f"127.0.0.1,,{port},tcp,open," in table["content"] and len(lines) == 1 + 3 * 2


PAGE_ROUNDS = 400


def open_many(listeners: Listeners, network: str, count: int) -> dict[str, set[int]]:
    """Three hosts of `network` (a /24 of this test's own 127.44.0.0/16): listen on `count` ports
    of .6 and two of .5 and .7, from port 20000 up (a port something else holds is skipped).
    The ports opened, by address: what the test may assert on."""
    crowded, *quiet = (f"{network}.{n}" for n in (6, 5, 7))
    opened: dict[str, set[int]] = {address: set() for address in (crowded, *quiet)}
    for port in range(20_000, 32_768):
        for address in opened:
            if len(opened[address]) < (count if address == crowded else 2) and listeners.open(port, address):
                opened[address].add(port)
        if len(opened[crowded]) == count:
            return opened
    raise RuntimeError(f"fewer than {count} free ports from 20000 on {crowded}")


async def every_page(client: Client, tool: str, **arguments: Any) -> list[dict[str, Any]]:
    """Every page of a paged answer, as a caller reads it: by page.next_offset, and through
    each host a page cut by the cut's next_port_offset. Each page must move on."""
    pages: list[dict[str, Any]] = []
    offset: int | None = 0
    while offset is not None:
        page = await answer_of(client, tool, **arguments, offset=offset)
        pages.append(page)
        cut = page["page"]["cut"]
        while cut is not None and cut["next_port_offset"] is not None:
            assert pages[-1]["truncated"] and f"port_offset {cut['next_port_offset']}" in pages[-1]["message"]
            pages.append(await answer_of(client, tool, **arguments, offset=cut["offset"], limit=1,
                                         port_offset=cut["next_port_offset"]))
            assert pages[-1]["page"]["cut"] is None or pages[-1]["page"]["cut"]["first_port"] == cut["next_port_offset"]
            cut = pages[-1]["page"]["cut"]
        following = page["page"]["next_offset"]
        assert following is None or following > offset, f"stuck at offset {offset}"
        assert len(pages) < PAGE_ROUNDS
        offset = following
    return pages


def found_ports(pages: list[dict[str, Any]], fmt: str) -> list[tuple[str, int]]:
    """(address, port) of every port the pages hold, in their order."""
    if fmt == "csv":
        return [(row["address"], int(row["port"])) for page in pages
                for row in csv.DictReader(io.StringIO(page["content"])) if row["port"]]
    hosts = [host for page in pages for host in (page["result"]["hosts"] if fmt == "json" else page["hosts"])]
    return [(host["address"], port["port"]) for host in hosts for port in host["ports"]]


@pytest.mark.parametrize(("network", "fmt", "view"), [
    ("127.44.1", "json", "summary"), ("127.44.2", "json", "full"), ("127.44.3", "csv", "summary")])
async def test_a_host_with_more_ports_than_an_answer_holds_is_paged_through_not_cut_silently(
    in_memory: OpenClient, listeners: Listeners, network: str, fmt: str, view: str,
) -> None:
    opened = open_many(listeners, network, 600)
    last = max(max(ports) for ports in opened.values())
    async with in_memory(max_answer_bytes=8_000) as alice:
        scan = await answer_of(alice, "custom_scan", command=f"-Pn -p 20000-{last} {network}.5-7", timeout=120)
        pages = await every_page(alice, "get_task_result", task_id=scan["task_id"], format=fmt, view=view)
        hosts = await every_page(alice, "find_hosts", network=f"{network}.0/24") if fmt == "csv" else []
    for found in (found_ports(pages, fmt), *([found_ports(hosts, "inventory")] if hosts else [])):
        assert len(found) == len(set(found)), "a port shown twice"
        assert all(ports <= {port for address_, port in found if address_ == address}
                   for address, ports in opened.items()), "a port the test opened is missing"
    cuts = [page["page"]["cut"] for page in pages if page["page"]["cut"]]
    assert cuts and {cut["address"] for cut in cuts} == {f"{network}.6"} and cuts[0]["ports"] >= 600
    assert cuts[0]["omitted"] == cuts[0]["ports"] - cuts[0]["shown"]
