"""What callers see of a stored result: views, pages, a byte cap, CSV, and diffs.

Agents have small context windows, so every answer is a page of hosts that fits under a
byte cap; `page` says how to ask for the rest. Pure functions over the models.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from typing import TypeVar

from pydantic import BaseModel

from models import (
    HostDetail,
    HostSummary,
    InventoryHost,
    InventoryPage,
    Page,
    PortChange,
    PortDetail,
    PortSummary,
    ScanDiff,
    ScanResult,
    ScanSummary,
    TaskAnswer,
    TaskRecord,
)

Answer = TypeVar("Answer", bound=BaseModel)
# The JSON-RPC envelope, the content block's keys, the server's _meta and SSE's "event:
# message", measured on real answers at about 170 bytes; with room to spare.
WIRE_FRAMING_BYTES = 400
CSV_FIELDS = ("address", "hostname", "port", "protocol", "state", "service", "product", "version", "extrainfo")
POLL_HINT = (
    "The scan continues in the background. Call get_task_result with task_id '{id}' "
    "to fetch the result, or what it found so far (get_task_status shows progress)."
)


def answer(record: TaskRecord) -> TaskAnswer:
    """A task's state without its result; unfinished tasks say how to poll."""
    message = None
    if not record.status.finished:
        done = f" ({record.progress.phase}, {record.progress.percent:.0f}%)" if record.progress else ""
        message = f"Scan {record.status.value}{done}. " + POLL_HINT.format(id=record.id)
    return TaskAnswer(
        status=record.status,
        task_id=record.id,
        kind=record.kind,
        target=record.target,
        pool=record.pool,
        worker=record.worker_name,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        message=message,
        error=record.error,
        progress=record.progress,
    )


def with_message(shown: TaskAnswer, note: str) -> TaskAnswer:
    """The answer with `note` put before whatever message it already had."""
    return shown.model_copy(update={"message": f"{note} {shown.message}" if shown.message else note})


def reuse_note(reused: TaskRecord) -> str:
    """Why the caller got an existing task instead of a new scan."""
    if reused.status.finished:
        age = time.time() - (reused.finished_at or reused.created_at)
        return f"This is the result of the same scan {age:.0f} s ago; pass rescan=true to scan again."
    return "The same scan was already under way; this is its task. Pass rescan=true to start another."


def more_hint(shown: TaskAnswer) -> TaskAnswer:
    """Say in words how to fetch the rest of a paged result."""
    if shown.page is None or shown.page.next_offset is None:
        return shown
    rest = (f"This answer holds {shown.page.unit} {shown.page.offset}-{shown.page.offset + shown.page.returned - 1}"
            f" of {shown.page.total}; call get_task_result with task_id '{shown.task_id}', format "
            f"'{shown.format}' and offset {shown.page.next_offset} for more.")
    return shown.model_copy(update={"message": f"{shown.message} {rest}" if shown.message else rest})


def with_requested_names(result: ScanResult, argv: list[str], target: str) -> ScanResult:
    """Give hosts the hostnames the caller asked for: nmap only saw resolved addresses
    (argv after `--`, in the order of the caller's targets)."""
    scanned = argv[argv.index("--") + 1:] if "--" in argv else []
    # The two lists align by construction; were they ever not to, names would just be lost.
    pairs = zip(scanned, target.split(), strict=False)
    names = {address: name for address, name in pairs if address != name}
    if not names:
        return result
    hosts = [
        h.model_copy(update={"hostnames": [names[h.address], *h.hostnames]}) if h.address in names else h
        for h in result.hosts
    ]
    return result.model_copy(update={"hosts": hosts})


def summarize(result: ScanResult, hosts: list[HostDetail]) -> ScanSummary:
    """The compact view: per host only its open ports, with service and version."""
    return ScanSummary(
        **result.model_dump(include=set(ScanSummary.model_fields) - {"hosts"}),
        hosts=[
            HostSummary(
                address=h.address,
                status=h.status,
                hostnames=h.hostnames,
                partial=h.partial,
                ports=[PortSummary(**p.model_dump(include=set(PortSummary.model_fields)))
                       for p in h.ports if p.state == "open"],
            )
            for h in hosts
        ],
    )


def json_page(base: TaskAnswer, result: ScanResult, *, view: str, offset: int, limit: int, cap: int) -> TaskAnswer:
    """The answer holding hosts [offset, offset+limit) in `view`, shrunk to fit `cap` bytes."""
    window = result.hosts[offset: offset + limit]

    def build(count: int) -> TaskAnswer:
        hosts = window[:count]
        shaped = result.model_copy(update={"hosts": hosts}) if view == "full" else summarize(result, hosts)
        return _paged(base.model_copy(update={"result": shaped}), offset, count, len(result.hosts))

    answer = _largest_fitting(build, len(window), cap)
    if answer is None and window:
        # Even one host is too big: keep the first host with as many ports as fit, or at
        # least its address and state, so that every page moves on by one host.
        first = window[0]
        answer = _largest_fitting(lambda n: _one_host(base, result, first, n, view, offset), len(first.ports), cap) or (
            _one_host(base, result, HostDetail(address=first.address, status=first.status, hostnames=[], ports=[]),
                      0, view, offset))
    return _mark_truncated(answer or build(0), requested=len(window))


def _one_host(base: TaskAnswer, result: ScanResult, host: HostDetail, ports: int, view: str, offset: int) -> TaskAnswer:
    trimmed = host.model_copy(update={"ports": host.ports[:ports]})
    shaped = result.model_copy(update={"hosts": [trimmed]}) if view == "full" else summarize(result, [trimmed])
    answer = _paged(base.model_copy(update={"result": shaped}), offset, 1, len(result.hosts))
    return answer.model_copy(update={"truncated": True})


def text_page(base: TaskAnswer, text: str, *, offset: int, cap: int) -> TaskAnswer:
    """An xml answer: a slice of the report's characters under the cap."""
    def build(count: int) -> TaskAnswer:
        chunk = text[offset: offset + count]
        page = Page(unit="characters", offset=offset, returned=len(chunk), total=len(text),
                    next_offset=offset + len(chunk) if offset + len(chunk) < len(text) else None)
        return more_hint(base.model_copy(update={"content": chunk, "page": page}))

    answer = _largest_fitting(build, max(len(text) - offset, 0), cap) or build(0)
    return answer.model_copy(update={"truncated": answer.page is not None and answer.page.next_offset is not None})


def csv_page(base: TaskAnswer, result: ScanResult, *, offset: int, limit: int, cap: int) -> TaskAnswer:
    """A csv answer: one row per reported port (or per host without ports) of a page of hosts."""
    window = result.hosts[offset: offset + limit]

    def build(count: int) -> TaskAnswer:
        answer = base.model_copy(update={"content": to_csv(window[:count])})
        return _paged(answer, offset, count, len(result.hosts))

    answer = _largest_fitting(build, len(window), cap) or build(0)
    return _mark_truncated(answer, requested=len(window))


def to_csv(hosts: list[HostDetail]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for host in hosts:
        name = host.hostnames[0] if host.hostnames else ""
        if not host.ports:
            writer.writerow([host.address, name, "", "", host.status, "", "", "", ""])
        for p in host.ports:
            writer.writerow([host.address, name, p.port, p.protocol, p.state, p.service, p.product,
                             p.product_version, p.extrainfo])
    return out.getvalue()


def _paged(answer: TaskAnswer, offset: int, count: int, total: int) -> TaskAnswer:
    following = offset + count
    page = Page(unit="hosts", offset=offset, returned=count, total=total,
                next_offset=following if following < total else None)
    return more_hint(answer.model_copy(update={"page": page}))


def _mark_truncated(answer: TaskAnswer, *, requested: int) -> TaskAnswer:
    cut = answer.truncated or (answer.page is not None and answer.page.returned < requested)
    return answer.model_copy(update={"truncated": cut})


def _largest_fitting(build: Callable[[int], Answer], most: int, cap: int) -> Answer | None:
    """Binary search for the largest count whose answer goes out within `cap` bytes."""
    best, low, high = None, 1, most
    if most == 0:
        empty = build(0)
        return empty if wire_size(empty) <= cap else None
    while low <= high:
        middle = (low + high) // 2
        candidate = build(middle)
        if wire_size(candidate) <= cap:
            best, low = candidate, middle + 1
        else:
            high = middle - 1
    return best


def wire_size(answer: BaseModel) -> int:
    """The bytes an answer takes on the wire. Every tool answer travels twice: as
    structuredContent and, as the MCP spec asks for backwards compatibility, as the same JSON
    in a text block, where each quote and backslash is escaped once more; plus the JSON-RPC
    and SSE framing around them."""
    body = answer.model_dump_json().encode()
    return 2 * len(body) + body.count(b'"') + body.count(b"\\") + WIRE_FRAMING_BYTES


def inventory_page(hosts: list[InventoryHost], total: int, offset: int, cap: int) -> InventoryPage:
    """A find_hosts answer: the hosts of this page that fit `cap` bytes, and where the rest starts."""

    def build(count: int) -> InventoryPage:
        following = offset + count
        page = Page(unit="hosts", offset=offset, returned=count, total=total,
                    next_offset=following if following < total else None)
        return InventoryPage(hosts=hosts[:count], page=page, truncated=count < len(hosts))

    shown = _largest_fitting(build, len(hosts), cap) or build(0)
    if shown.page.next_offset is None:
        return shown
    note = f"{total} hosts match; pass offset {shown.page.next_offset} for the next ones."
    return shown.model_copy(update={"message": note})


def capped_diff(diff: ScanDiff, cap: int) -> ScanDiff:
    """The diff, with each change list cut to a common length so that it fits `cap` bytes."""
    lists = ("hosts_came_up", "hosts_went_down", "ports_opened", "ports_closed", "services_changed")
    longest = max(len(getattr(diff, name)) for name in lists)

    def build(count: int) -> ScanDiff:
        return diff.model_copy(update={name: getattr(diff, name)[:count] for name in lists})

    fitted = _largest_fitting(build, longest, cap) or build(0)
    return fitted.model_copy(update={"truncated": fitted != diff})


def diff_results(task_a: str, a: ScanResult, task_b: str, b: ScanResult) -> ScanDiff:
    """Hosts that came up or went down; ports opened, closed, or whose service changed."""
    up_a = {h.address for h in a.hosts if h.status == "up"}
    up_b = {h.address for h in b.hosts if h.status == "up"}
    open_a, open_b = _open_ports(a), _open_ports(b)
    changed = [
        _change(key, open_a[key], open_b[key])
        for key in sorted(open_a.keys() & open_b.keys())
        if _describe(open_a[key]) != _describe(open_b[key])
    ]
    return ScanDiff(
        task_a=task_a,
        task_b=task_b,
        hosts_came_up=sorted(up_b - up_a),
        hosts_went_down=sorted(up_a - up_b),
        ports_opened=[_change(k, None, open_b[k]) for k in sorted(open_b.keys() - open_a.keys())],
        ports_closed=[_change(k, open_a[k], None) for k in sorted(open_a.keys() - open_b.keys())],
        services_changed=changed,
        unchanged_open_ports=len(open_a.keys() & open_b.keys()) - len(changed),
    )


PortKey = tuple[str, str, int]


def _open_ports(result: ScanResult) -> dict[PortKey, PortDetail]:
    return {(h.address, p.protocol, p.port): p for h in result.hosts for p in h.ports if p.state == "open"}


def _describe(port: PortDetail | None) -> str:
    if port is None:
        return ""
    return " ".join(part for part in (port.state, port.service, port.version) if part)


def _change(key: PortKey, before: PortDetail | None, after: PortDetail | None) -> PortChange:
    address, protocol, port = key
    return PortChange(address=address, port=port, protocol=protocol, before=_describe(before), after=_describe(after))
