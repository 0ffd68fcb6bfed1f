"""views.py: pages, byte caps, csv and xml answers, and diffs, on recorded results."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from models import (
    HostDetail,
    InventoryHost,
    InventoryPage,
    InventoryPort,
    PortText,
    ScanKind,
    ScanResult,
    ScriptOutput,
    TaskAnswer,
    TaskStatus,
    VersionChange,
)
from nmap_report import parse_report
from tests.support import paged
from views import (
    ANSWER_ROOM,
    csv_page,
    csv_rows,
    diff_results,
    inventory_page,
    json_host_bytes,
    json_page,
    summary_host,
    text_page,
    text_wire_bytes,
    wire_size,
)

FIXTURES = Path(__file__).parent / "fixtures"
PORTS = json.loads((FIXTURES / "ports.json").read_text())
BASE = TaskAnswer(status=TaskStatus.COMPLETED, task_id="t", kind=ScanKind.CUSTOM, target="x", created_at=0.0)


def recorded(name: str) -> ScanResult:
    return parse_report((FIXTURES / name).read_bytes(), "127.0.0.1")


def many_hosts(count: int) -> ScanResult:
    """A large result made by replicating a real host under distinct addresses."""
    result = recorded("rich_loopback.xml")
    host = result.hosts[0]
    hosts = [host.model_copy(update={"address": f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"}) for i in range(count)]
    return result.model_copy(update={"hosts": hosts, "hosts_total": count, "hosts_up": count})


def size(answer: TaskAnswer) -> int:
    return wire_size(answer)


def test_summary_keeps_the_seed_shape_with_open_ports_only() -> None:
    answer = json_page(BASE, **paged(recorded("rich_loopback.xml"), 0, 50), view="summary", cap=60_000)
    document = json.loads(answer.model_dump_json())["result"]
    [host] = document["hosts"]
    assert set(host) == {"address", "status", "hostnames", "ports"}
    assert host["ports"] == [{"port": PORTS["banner"], "protocol": "tcp", "state": "open", "service": "ssh",
                              "untrusted": {"product": "OpenSSH", "version": "9.2p1 Debian 2+deb12u3"}}]
    assert document["open_ports"] == 1 and "exit_status" not in document


def test_full_view_has_every_detail() -> None:
    answer = json_page(BASE, **paged(recorded("rich_loopback.xml"), 0, 50), view="full", cap=60_000)
    host = json.loads(answer.model_dump_json())["result"]["hosts"][0]
    assert {"os_matches", "uptime_s", "distance", "extraports", "addresses", "reason"} <= set(host)
    assert len(host["ports"]) == 2 and host["ports"][0]["untrusted"]["scripts"][0]["id"] == "banner"
    assert "untrusted" not in host["ports"][1] and "suspicious" not in host["ports"][0], "empty fields are left out"


@pytest.mark.parametrize("view", ["summary", "full"])
@pytest.mark.parametrize("cap", [8_000, 20_000, 60_000])
def test_pages_never_exceed_the_cap_and_cover_every_host_once(view: str, cap: int) -> None:
    result = many_hosts(600)
    seen: list[str] = []
    offset: int | None = 0
    while offset is not None:
        answer = json_page(BASE, **paged(result, offset, 1000), view=view, cap=cap)
        assert size(answer) <= cap
        assert answer.page is not None and answer.page.returned >= 1
        assert answer.truncated is (answer.page.returned < min(1000, 600 - offset))
        seen += [h.address for h in answer.result.hosts]  # type: ignore[union-attr]
        offset = answer.page.next_offset
    assert seen == [h.address for h in result.hosts]


@pytest.mark.parametrize("form", ["summary", "full", "csv"])
def test_a_page_sized_by_adding_up_its_hosts_leaves_out_only_what_its_room_would_hold(form: str) -> None:
    result = many_hosts(600)
    answer = page_with(form, result, 600, 20_000)
    assert answer.page is not None and 0 < answer.page.returned < 600 and size(answer) <= 20_000
    hosts = result.hosts if form != "summary" else [summary_host(h) for h in result.hosts]
    each = min(text_wire_bytes(csv_rows(h)) if form == "csv" else json_host_bytes(h)  # type: ignore[arg-type]
               for h in hosts)
    # The room, and the host that did not fit beside it.
    more = answer.page.returned + ANSWER_ROOM // each + 2
    assert size(page_with(form, result, more, 10**9)) > 20_000, "that many more would not have fitted"


def page_with(form: str, result: ScanResult, count: int, cap: int) -> TaskAnswer:
    """The page of the first `count` hosts of `result` in `form` (json view or csv) under `cap`."""
    window = paged(result, 0, count)
    if form == "csv":
        return csv_page(BASE.model_copy(update={"format": "csv"}), **window, cap=cap)
    return json_page(BASE, **window, view=form, cap=cap)


def crowded(ports: int, *, script_output: str | None = None) -> ScanResult:
    """A small host, a host with `ports` open ports (each with this script output), a small host."""
    result = recorded("rich_loopback.xml")
    host = result.hosts[0]
    scripts = [] if script_output is None else [ScriptOutput(id="banner", output=script_output)]
    port = host.ports[0].model_copy(update={"untrusted": PortText(scripts=scripts)})
    big = host.model_copy(update={"address": "10.0.0.2", "ports": [port.model_copy(update={"port": p})
                                                                    for p in range(1, ports + 1)]})
    small = [host.model_copy(update={"address": f"10.0.0.{n}"}) for n in (1, 3)]
    return result.model_copy(update={"hosts": [small[0], big, small[1]]})


def page_through(read: Callable[[int, int, int], Any]) -> list[Any]:
    """Every page `read(offset, limit, port_offset)` answers, following next_offset and each
    cut's next_port_offset. Each must move on."""
    pages: list[Any] = []
    offset: int | None = 0
    while offset is not None:
        first = read(offset, 50, 0)
        pages.append(first)
        cut = first.page.cut
        while cut is not None and cut.next_port_offset is not None:
            pages.append(read(cut.offset, 1, cut.next_port_offset))
            cut = pages[-1].page.cut
        assert first.page.next_offset is None or first.page.next_offset > offset
        assert len(pages) < 500
        offset = first.page.next_offset
    return pages


def ports_in(pages: list[Any]) -> list[tuple[str, int]]:
    """(address, port) of every port json or find_hosts pages hold, in their order."""
    hosts = [h for page in pages for h in (page.hosts if isinstance(page, InventoryPage) else page.result.hosts)]
    return [(h.address, p.port) for h in hosts for p in h.ports]


@pytest.mark.parametrize("view", ["summary", "full"])
def test_a_host_larger_than_the_cap_comes_alone_with_a_cut_that_pages_through_its_ports(view: str) -> None:
    result = crowded(600)
    pages = page_through(lambda offset, limit, port_offset: json_page(
        BASE, **paged(result, offset, limit), view=view, cap=8_000, port_offset=port_offset))
    shown = [(h.address, p.port) for h in result.hosts for p in h.ports if view == "full" or p.state == "open"]
    assert ports_in(pages) == shown and len(shown) > 600
    assert all(size(page) <= 8_000 for page in pages)
    cut = pages[1].page.cut
    assert cut is not None and pages[1].truncated and [h.address for h in pages[1].result.hosts] == ["10.0.0.2"]
    assert (cut.address, cut.offset, cut.ports, cut.first_port) == ("10.0.0.2", 1, 600, 0)
    assert cut.omitted == 600 - cut.shown and cut.next_port_offset == cut.shown
    assert (f"for the {cut.omitted} after those call get_task_result with task_id 't', format 'json', view '{view}', "
            f"offset 1, limit 1 and port_offset {cut.shown}") in (pages[1].message or "")
    assert pages[1].page.next_offset == 2, "a caller that follows next_offset alone moves on"


def test_csv_and_inventory_pages_move_on_past_a_host_larger_than_the_cap() -> None:
    result = crowded(600)
    pages = page_through(lambda offset, limit, port_offset: csv_page(
        BASE.model_copy(update={"format": "csv"}), **paged(result, offset, limit), cap=8_000,
        port_offset=port_offset))
    assert len(pages) > 3 and all(size(page) <= 8_000 for page in pages)
    in_rows = [(row["address"], int(row["port"])) for page in pages
               for row in csv.DictReader(io.StringIO(page.content or ""))]
    assert in_rows == [(h.address, p.port) for h in result.hosts for p in h.ports]
    inventory = [InventoryHost(address=h.address, status="up", hostnames=[], os="", os_confirmed_at=None,
                               os_task_id=None, first_seen=0, last_seen=0,
                               changed_at=0, last_task_id="t", ports=[InventoryPort(
                                   port=p.port, protocol="tcp", state="open", service="", version_confirmed_at=None,
                                   version_task_id=None, scripts=[], scripts_confirmed_at=None, scripts_task_id=None,
                                   first_seen=0, last_seen=0, changed_at=0, last_task_id="t")
                                   for p in h.ports]) for h in result.hosts]
    pages = page_through(lambda offset, limit, port_offset: inventory_page(
        inventory[offset: offset + limit], len(inventory), offset, 8_000, port_offset=port_offset))
    assert ports_in(pages) == [(h.address, p.port) for h in inventory for p in h.ports]
    assert pages[1].truncated and "call find_hosts with the same filters, offset 1, limit 1" in (pages[1].message or "")


def test_a_port_larger_than_the_cap_alone_is_skipped_and_said_so() -> None:
    result = crowded(3, script_output="x" * 2000)
    answer = json_page(BASE, **paged(result, 1, 1), view="full", cap=8_000)
    cut = answer.page.cut if answer.page else None
    assert cut is not None and (cut.shown, cut.omitted, cut.next_port_offset) == (0, 3, 1)
    assert "the port at port_offset 0 alone is larger than an answer may be" in (answer.message or "")
    assert "for the 2 after those" in (answer.message or "") and size(answer) <= 8_000


def test_limit_and_offset_page_through_hosts() -> None:
    result = recorded("multi_host.xml")
    answer = json_page(BASE, **paged(result, 2, 3), view="summary", cap=60_000)
    assert [h.address for h in answer.result.hosts] == ["127.0.0.3", "127.0.0.4", "127.0.0.5"]  # type: ignore[union-attr]
    assert answer.page is not None and (answer.page.total, answer.page.next_offset) == (8, 5)
    assert not answer.truncated
    last = json_page(BASE, **paged(result, 5, 3), view="summary", cap=60_000)
    assert last.page is not None and last.page.next_offset is None


def test_csv_has_one_row_per_port() -> None:
    answer = csv_page(BASE.model_copy(update={"format": "csv"}), **paged(recorded("rich_loopback.xml"), 0, 50),
                      cap=60_000)
    rows = list(csv.DictReader(io.StringIO(answer.content or "")))
    assert [(r["port"], r["state"], r["service"], r["untrusted_product"]) for r in rows] == [
        (str(PORTS["banner"]), "open", "ssh", "OpenSSH"), (str(PORTS["closed"]), "closed", "ndmps", ""),
    ]
    big = csv_page(BASE, **paged(many_hosts(2000), 0, 1000), cap=10_000)
    assert size(big) <= 10_000 and big.truncated and big.page is not None and big.page.next_offset


def test_xml_pages_reassemble_into_the_original_report() -> None:
    raw = (FIXTURES / "rich_loopback.xml").read_text()
    parts, offset = [], 0
    while offset is not None:
        answer = text_page(BASE.model_copy(update={"format": "xml"}), raw[offset: offset + 8_000], offset=offset,
                           total=len(raw), cap=8_000)
        assert size(answer) <= 8_000
        parts.append(answer.content or "")
        offset = answer.page.next_offset if answer.page else None
    assert len(parts) > 1 and "".join(parts) == raw
    assert parse_report("".join(parts), "127.0.0.1") == recorded("rich_loopback.xml")


MIXED = 'plain <a b="c"> back\\slash\nline\ttab\rcr \x01\x1f é € 😀 '


def test_what_characters_cost_on_the_wire_is_counted_exactly() -> None:
    empty = wire_size(BASE.model_copy(update={"content": ""}))
    for text in (MIXED, MIXED * 50, "x", '"', "\\", "\n", "\x00", "😀"):
        assert wire_size(BASE.model_copy(update={"content": text})) - empty == text_wire_bytes(text), repr(text)
    # Backspace and form feed are counted as any control character: at most what they cost.
    assert wire_size(BASE.model_copy(update={"content": "\b\f"})) - empty < text_wire_bytes("\b\f")


def test_an_xml_page_is_filled_to_the_cap_whatever_its_characters() -> None:
    text = MIXED * 2000
    answer = text_page(BASE.model_copy(update={"format": "xml"}), text[:8_000], offset=0, total=len(text), cap=8_000)
    assert 0.95 * 8_000 < size(answer) <= 8_000, "what is left is the room kept for a note and the page's numbers"
    assert answer.page is not None and answer.content == text[:answer.page.returned] and answer.truncated


def test_diff_reports_hosts_and_ports_that_changed() -> None:
    before = recorded("multi_host.xml")
    after_hosts = [h for h in before.hosts if h.address != "127.0.0.8"]
    opened = after_hosts[0].model_copy(update={"ports": [
        *after_hosts[0].ports,
        recorded("rich_loopback.xml").hosts[0].ports[0],
    ]})
    third = next(h for h in after_hosts if h.address == "127.0.0.3")
    closed = third.model_copy(update={"ports": [p.model_copy(update={"state": "closed"}) for p in third.ports]})
    after = before.model_copy(update={"hosts": [opened, *[closed if h is third else h for h in after_hosts[1:]]]})
    diff = diff_results("a", before.hosts, "b", after.hosts)
    assert diff.hosts_went_down == ["127.0.0.8"] and diff.hosts_came_up == []
    assert [(c.address, c.port, c.after, c.untrusted) for c in diff.ports_opened] == [
        ("127.0.0.1", PORTS["banner"], "open ssh", VersionChange(after="OpenSSH 9.2p1 Debian 2+deb12u3"))]
    assert [(c.address, c.port, c.after) for c in diff.ports_closed] == [("127.0.0.3", PORTS["multi"], "")]
    assert diff.services_changed == [] and diff.unchanged_open_ports == 0


def test_diff_pairs_two_results_hosts_by_address_read_once_side_by_side() -> None:
    [host] = recorded("rich_loopback.xml").hosts

    def at(*lasts: int) -> Iterator[HostDetail]:
        # A generator, as the stored hosts come: each read once, in address order.
        return (host.model_copy(update={"address": f"127.0.0.{last}"}) for last in lasts)

    diff = diff_results("a", at(1, 2, 10, 200), "b", at(2, 9, 10, 30, 200))
    assert diff.hosts_came_up == ["127.0.0.30", "127.0.0.9"] and diff.hosts_went_down == ["127.0.0.1"]
    opened = sum(p.state == "open" for p in host.ports)
    assert [c.address for c in diff.ports_opened] == ["127.0.0.30"] * opened + ["127.0.0.9"] * opened
    assert diff.unchanged_open_ports == 3 * opened and diff.services_changed == []


def test_hostnames_the_caller_asked_for_are_shown() -> None:
    from views import with_requested_names

    page = paged(recorded("multi_host.xml"), 0, 50)["page"]
    argv = ["nmap", "-sT", "-n", "--", "127.0.0.1", "127.0.0.2"]
    named = list(with_requested_names(page, argv, "localhost 127.0.0.2").hosts)
    assert named[0].hostnames == ["localhost"] and named[1].hostnames == []
    assert with_requested_names(page, argv, "127.0.0.1 127.0.0.2") is page


def test_a_large_diff_is_cut_to_fit_the_cap() -> None:
    from views import capped_diff

    empty = many_hosts(0)
    diff = diff_results("a", empty.hosts, "b", many_hosts(500).hosts)
    assert len(diff.ports_opened) == 500 and len(diff.hosts_came_up) == 500
    cut = capped_diff(diff, 6_000)
    assert len(cut.model_dump_json().encode()) <= 6_000 and cut.truncated
    assert 0 < len(cut.ports_opened) < 500 and cut.ports_opened == diff.ports_opened[: len(cut.ports_opened)]
    assert capped_diff(diff, 10_000_000) == diff and not diff.truncated
