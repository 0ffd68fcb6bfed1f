"""Results stored so that a page reads a page.

A task's result is kept in two parts: its head (the ScanResult without hosts: counts,
warnings, errors) in the task's row, and its hosts in `result_chunks`, in the result's order
(by address), CHUNK_HOSTS to a row, each row a zlib-compressed JSON array. A page of
get_task_result reads the head and the one or two chunks it shows, so that its cost depends
on the page, not on the result: parsing a 16,384-host result whole for every page made
paging through it quadratic (issue 24).

A sharded scan's hosts are stored once: each shard writes its chunks as it ends, and the
last shard's verdict moves them all under the parent (renumbered, not rewritten), where the
parent's merged head joins them.

The whole result is still assembled for what compares results (diff_scans, a schedule's
changes) and for evidence, which hashes the JSON exactly as it was written before chunks:
`whole_json` gives that text back byte for byte.

nmap's XML report is kept the same way, in pieces (`report_pieces`), paged in characters: each
run's exact bytes (evidence hashes them), and a sharded scan's report is its shards' in turn.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import pairwise
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from findings import CHUNK_HOSTS, PIECE_BYTES, Chunk, HostSpool, ScanOutcome, address_key
from models import (
    HostDetail,
    HostSummary,
    ResultPage,
    ScanResult,
    report_pieces,
    result_chunks,
    stored_hosts,
    stored_result,
    stored_summaries,
    tasks,
)

# A host as a page reads it: in every detail, or in the summary view.
Host = TypeVar("Host", HostDetail, HostSummary)
# Where the head's JSON holds its (empty) host list: the hosts' text goes back in there.
# Nothing before it can hold that text unescaped (strings escape their quotes).
_NO_HOSTS = '"hosts":[]'

_HEAD = select(tasks.c.result, tasks.c.result_hosts).where(tasks.c.id == bindparam("p_id"))
# The chunks that hold hosts [p_from + CHUNK_HOSTS, p_to): a chunk that holds host n starts
# after n - CHUNK_HOSTS.
_PAGE_CHUNKS = (
    select(result_chunks.c.first_host, result_chunks.c.data)
    .where(result_chunks.c.task_id == bindparam("p_id"), result_chunks.c.first_host > bindparam("p_from"),
           result_chunks.c.first_host < bindparam("p_to"))
    .order_by(result_chunks.c.first_host)
)
_ALL_CHUNKS = (select(result_chunks.c.data).where(result_chunks.c.task_id == bindparam("p_id"))
               .order_by(result_chunks.c.first_host))
# A task's runs with their reports' lengths: itself, or a sharded task's shards in order.
_REPORT_RUNS = (select(tasks.c.id, func.coalesce(tasks.c.report_chars, 0))
                .where((tasks.c.id == bindparam("p_id")) & (tasks.c.shard_count == 0)
                       | (tasks.c.parent_id == bindparam("p_id")))
                .order_by(tasks.c.created_at))
# The pieces holding characters [p_from + PIECE_BYTES, p_to) of a run's report (a piece has
# at most PIECE_BYTES characters).
_REPORT_PIECES = (
    select(report_pieces.c.first_char, report_pieces.c.data)
    .where(report_pieces.c.task_id == bindparam("p_id"), report_pieces.c.first_char > bindparam("p_from"),
           report_pieces.c.first_char < bindparam("p_to"))
    .order_by(report_pieces.c.first_char)
)
# A task's chunks holding hosts after an address (p_after: its key) within [p_from, p_to], in
# order: chunks hold disjoint runs of addresses, so their last keys run in the hosts' order.
_CHUNKS_AFTER = (
    select(result_chunks.c.data)
    .where(result_chunks.c.task_id == bindparam("p_id"), result_chunks.c.last_key > bindparam("p_after"),
           result_chunks.c.last_key >= bindparam("p_from"), result_chunks.c.first_key <= bindparam("p_to"))
    .order_by(result_chunks.c.last_key).limit(bindparam("p_limit"))
)
_MOVE_CHUNKS = (update(result_chunks).where(result_chunks.c.task_id == bindparam("p_shard"))
                .values(task_id=bindparam("p_parent"), first_host=result_chunks.c.first_host + bindparam("p_base")))


class Encoded(NamedTuple):
    """What a run found, as it is written: the columns of its task's row (the result's head,
    the report's length and the evidence of its bytes), its result's chunks and its report's
    pieces."""

    columns: dict[str, Any]
    chunks: list[dict[str, Any]]
    pieces: list[dict[str, Any]]


class ReportPage(NamedTuple):
    """Characters of a task's XML report from an offset, and how many it has in all."""

    text: str
    total: int


class StoredParts(NamedTuple):
    """A result as read, not yet parsed: its head and its chunks (compressed), in order."""

    head: str
    chunks: list[bytes]


class StoredPage(NamedTuple):
    """A page of a result as read, not yet parsed: the head, the result's host count, and the
    chunks holding the page's hosts, each with the number of its first host."""

    head: str
    total: int
    chunks: list[tuple[int, bytes]]


def encoded(task_id: str, outcome: ScanOutcome) -> Encoded:
    """What a run found as it is written: its hosts' chunks and its report's pieces are the
    ones the worker compressed as nmap reported them (findings.py), so that writing a big
    result compresses nothing and holds no lock for it."""
    result, report = outcome.result, outcome.report
    chunks = [] if result is None else _chunk_rows(task_id, outcome.hosts.chunks())
    pieces, chars = [], 0
    for piece in report.pieces():
        pieces.append({"task_id": task_id, "first_char": chars, "chars": piece.chars, "data": piece.data})
        chars += piece.chars
    return Encoded({
        "result": None if result is None else result.model_copy(update={"hosts": []}).model_dump_json(),
        "result_hosts": None if result is None else outcome.hosts.count,
        "report_chars": chars if report.size else None,
        # The evidence of nmap's exact bytes, as get_task_result's xml gives them back.
        "raw_xml_sha256": report.sha256() if report.size else None,
        "raw_xml_size": report.size if report.size else None,
    }, chunks, pieces)


def read_page(conn: Connection, task_id: str, offset: int, limit: int) -> StoredPage | None:
    """The chunks holding hosts [offset, offset + limit) of the task's result, with its head;
    None when it has no result."""
    row = conn.execute(_HEAD, {"p_id": task_id}).first()
    if row is None or row.result is None:
        return None
    chunks = conn.execute(_PAGE_CHUNKS, {"p_id": task_id, "p_from": offset - CHUNK_HOSTS, "p_to": offset + limit})
    return StoredPage(row.result, row.result_hosts or 0, [(first, data) for first, data in chunks])


def page_of(stored: StoredPage, offset: int, limit: int) -> ResultPage:
    """What `read_page` read: its head parsed, and hosts [offset, offset + limit), each chunk
    decompressed and parsed when a host of it is first wanted."""
    count = max(min(offset + limit, stored.total) - offset, 0)
    end = offset + count
    return ResultPage(stored_result(stored.head), _hosts_of_chunks(stored.chunks, offset, end, stored_hosts), offset,
                      count, stored.total, _hosts_of_chunks(stored.chunks, offset, end, stored_summaries))


def _hosts_of_chunks(chunks: Iterable[tuple[int, bytes]], start: int, end: int,
                     read: Callable[[bytes], list[Host]]) -> Iterator[Host]:
    """Hosts [start, end) of a result, `read` from the chunks that hold them (each with its first host's number)."""
    for first, data in chunks:
        yield from read(zlib.decompress(data))[max(start - first, 0): end - first]


class HostRun(NamedTuple):
    """Hosts of a result read a few chunks at a time: those after the address asked for, in
    order; the address of the last host read (None: none); `more`: chunks may follow (as many
    were read as asked)."""

    hosts: list[HostDetail]
    last: str | None
    more: bool


def hosts_after(conn: Connection, task_id: str, after: str | None, chunks: int,
                within: tuple[str, str] | None = None) -> HostRun:
    """The hosts of the task's result after the address `after` (from the first when None), of
    `chunks` chunks at most, whose chunks hold addresses within `within` (the first and last
    address) when given: what the fold reads a batch at a time, never the whole result."""
    low, high = (address_key(within[0]), address_key(within[1])) if within else ("", "~")
    after_key = "" if after is None else address_key(after)
    rows = conn.execute(_CHUNKS_AFTER, {"p_id": task_id, "p_after": after_key, "p_from": low, "p_to": high,
                                        "p_limit": chunks}).scalars().all()
    if not rows:
        return HostRun([], None, False)
    # Only the first chunk can hold hosts up to `after` (one of a shard's, moved under its parent
    # and merged with others: the cursor may fall inside it).
    first = [host for host in stored_hosts(zlib.decompress(rows[0])) if address_key(host.address) > after_key]
    hosts = first + [host for data in rows[1:] for host in stored_hosts(zlib.decompress(data))]
    return HostRun(hosts, hosts[-1].address, len(rows) == chunks)


def read_whole(conn: Connection, task_id: str) -> StoredParts | None:
    """The task's whole result as stored; None when it has none."""
    row = conn.execute(_HEAD, {"p_id": task_id}).first()
    if row is None or row.result is None:
        return None
    return StoredParts(row.result, list(conn.execute(_ALL_CHUNKS, {"p_id": task_id}).scalars()))


def assembled(parts: StoredParts) -> ScanResult:
    """A whole result from its stored parts."""
    return stored_result(parts.head).model_copy(update={"hosts": list(hosts_in(parts))})


def hosts_in(parts: StoredParts) -> Iterator[HostDetail]:
    """A stored result's hosts in its order (by address), parsed a chunk at a time: what
    compares two results holds them compressed, never both parsed whole."""
    for chunk in parts.chunks:
        yield from stored_hosts(zlib.decompress(chunk))


def whole_json(parts: StoredParts) -> Iterator[bytes]:
    """The result's JSON, exactly as ScanResult.model_dump_json wrote it (UTF-8), a chunk at a
    time: what hashes it needs no more, and what keeps it holds it once."""
    before, _, after = parts.head.partition(_NO_HOSTS)
    yield f'{before}"hosts":['.encode()
    for number, chunk in enumerate(parts.chunks):
        yield (b"," if number else b"") + zlib.decompress(chunk)[1:-1]
    yield f"]{after}".encode()


def adopt_shards(conn: Connection, parent_id: str, shard_ids: Sequence[str]) -> int:
    """Move the shards' chunks under their parent, in address order, and return how many
    hosts the parent has. Shards whose addresses follow one another (the shards of sorted,
    disjoint targets: the usual case) are laid end to end by renumbering their rows; when
    the caller's targets interleave them, their hosts are merged by address and written again."""
    spans = _spans(conn.execute(select(
        result_chunks.c.task_id, result_chunks.c.host_count, result_chunks.c.first_key, result_chunks.c.last_key,
    ).where(result_chunks.c.task_id.in_(shard_ids))).all())
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    if all(a[1][1] < b[1][0] for a, b in pairwise(ordered)):
        moves, base = [], 0
        for shard_id, (_, _, count) in ordered:
            moves.append({"p_shard": shard_id, "p_parent": parent_id, "p_base": base})
            base += count
        if moves:
            conn.execute(_MOVE_CHUNKS, moves)
        return base
    # Merged as a worker sorts what nmap reports: a buffer of hosts parsed at a time.
    merged = HostSpool()
    for shard_id, _ in ordered:
        for host in _hosts_of(conn, shard_id):
            merged.add(host)
    conn.execute(delete(result_chunks).where(result_chunks.c.task_id.in_(shard_ids)))
    write_found(conn, Encoded({}, _chunk_rows(parent_id, merged.chunks()), []))
    return merged.count


def write_found(conn: Connection, found: Encoded) -> None:
    """A run's result chunks and report pieces, written with its verdict."""
    for table, rows in ((result_chunks, found.chunks), (report_pieces, found.pieces)):
        if rows:
            conn.execute(insert(table), rows)


def read_report(conn: Connection, task_id: str, offset: int, count: int) -> ReportPage | None:
    """Up to `count` characters of the task's XML report from `offset` (a sharded task's: its
    shards' reports in turn), reading only the pieces that hold them; None when it has none."""
    runs = conn.execute(_REPORT_RUNS, {"p_id": task_id}).all()
    if not any(chars for _, chars in runs):
        return None
    text, base, end = [], 0, offset + count
    for run_id, chars in runs:
        if base < end and offset < base + chars:
            text.append(_run_text(conn, run_id, max(offset - base, 0), min(end - base, chars)))
        base += chars
    return ReportPage("".join(text), base)


def report_bytes(conn: Connection, task_id: str) -> bytes | None:
    """One run's XML report, its exact bytes; None when it has none."""
    pieces = conn.execute(select(report_pieces.c.data).where(report_pieces.c.task_id == task_id)
                          .order_by(report_pieces.c.first_char)).scalars().all()
    return b"".join(zlib.decompress(piece) for piece in pieces) if pieces else None


def delete_found(conn: Connection, task_ids: Iterable[str]) -> None:
    """What the tasks found: their result chunks and report pieces."""
    ids = list(task_ids)
    conn.execute(delete(result_chunks).where(result_chunks.c.task_id.in_(ids)))
    conn.execute(delete(report_pieces).where(report_pieces.c.task_id.in_(ids)))


def _run_text(conn: Connection, run_id: str, start: int, end: int) -> str:
    """Characters [start, end) of one run's report."""
    rows = conn.execute(_REPORT_PIECES, {"p_id": run_id, "p_from": start - PIECE_BYTES, "p_to": end})
    return "".join(zlib.decompress(data).decode("utf-8", "replace")[max(start - first, 0): end - first]
                   for first, data in rows)


def _chunk_rows(task_id: str, chunks: Iterable[Chunk]) -> list[dict[str, Any]]:
    rows, first = [], 0
    for chunk in chunks:
        rows.append({"task_id": task_id, "first_host": first, **chunk._asdict()})
        first += chunk.host_count
    return rows


def _spans(rows: Iterable[Any]) -> dict[str, tuple[str, str, int]]:
    """Per shard: the sort keys of its first and last address, and its host count."""
    spans: dict[str, tuple[str, str, int]] = {}
    for row in rows:
        first, last, count = spans.get(row.task_id, (row.first_key, row.last_key, 0))
        spans[row.task_id] = (min(first, row.first_key), max(last, row.last_key), count + row.host_count)
    return spans


def _hosts_of(conn: Connection, task_id: str) -> Iterator[HostDetail]:
    for chunk in conn.execute(_ALL_CHUNKS, {"p_id": task_id}).scalars():
        yield from stored_hosts(zlib.decompress(chunk))
