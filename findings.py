"""What a scan found, held compactly while nmap runs, and the verdict that carries it.

A worker used to hold every host of its scan as models until the verdict (about 7 kB a host:
25 pydantic instances each, 116 MB at 16,384 hosts) and nmap's XML twice. Here the hosts are
kept parsed only `buffer_hosts` at a time (a setting): then they are sorted by address and
compressed into the chunks result_store writes (CHUNK_HOSTS hosts to a zlib JSON array), and
nmap's XML is compressed into the pieces result_store writes (PIECE_BYTES each) as it
arrives. What a scan holds grows with its result only compressed (about 12 bytes a closed
-Pn host, 0.2 MB at 16,384), and the verdict writes those chunks and pieces as they are.

Sorted runs of hosts follow one another when nmap reports its hosts in address order (its host
groups go through the targets in turn, the usual case); when they interleave (targets given
out of order, --randomize-hosts), they are merged by address at the verdict, a chunk of each
at a time.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import NamedTuple

from pydantic import TypeAdapter

from inventory import address_key as inventory_key
from models import HostDetail, PortDetail, ScanResult, TaskStatus, stored_hosts

# Hosts per chunk: a page's default of 50 hosts reads one or two chunks; a chunk of hosts with
# many ports stays well under a megabyte. Reads rely on no chunk holding more than this
# (a smaller chunk, as the last of a sorted run, is fine).
CHUNK_HOSTS = 64
# Bytes of nmap's XML per piece: an xml page (a cap's worth of characters, 60,000 by default)
# reads one piece or two.
PIECE_BYTES = 256 * 1024
# Hosts a running scan holds parsed before sorting and compressing them, by default (config
# `scan_buffer_hosts`): about 7 MB of models at 1,024.
BUFFER_HOSTS = 1024

_HOSTS = TypeAdapter(list[HostDetail])


def address_key(address: str) -> str:
    """inventory.address_key (IPv4 before IPv6, then by value), anything else last: the order
    of a result's hosts."""
    try:
        return inventory_key(address)
    except ValueError:
        return "9"


class Chunk(NamedTuple):
    """Consecutive hosts of a result in address order, compressed: how many, the address keys
    of the first and the last, and the zlib-compressed JSON array."""

    host_count: int
    first_key: str
    last_key: str
    data: bytes


def chunks_of(hosts: list[HostDetail]) -> Iterator[Chunk]:
    """Hosts already in address order, CHUNK_HOSTS to a chunk."""
    for first in range(0, len(hosts), CHUNK_HOSTS):
        part = hosts[first: first + CHUNK_HOSTS]
        yield Chunk(len(part), address_key(part[0].address), address_key(part[-1].address),
                    zlib.compress(_HOSTS.dump_json(part)))


def hosts_of(chunk: Chunk) -> list[HostDetail]:
    return stored_hosts(zlib.decompress(chunk.data))


@dataclass
class HostSpool:
    """A scan's listed hosts (those nmap did not find down), `buffer_hosts` parsed at most,
    the rest in sorted runs of compressed chunks; with what its head and a full scan's second
    phase need counted as they come."""

    buffer_hosts: int = BUFFER_HOSTS
    count: int = 0
    open_ports: int = 0
    # Addresses of hosts that timed out, and the open ports of each host that has one (a full
    # scan's version detection runs on those): what was found, not every host scanned.
    timed_out: list[str] = field(default_factory=list)
    open_by_host: dict[str, list[tuple[str, int]]] = field(default_factory=dict)
    _buffer: list[HostDetail] = field(default_factory=list)
    _runs: list[list[Chunk]] = field(default_factory=list)

    @classmethod
    def of(cls, hosts: Iterable[HostDetail]) -> HostSpool:
        spool = cls()
        for host in hosts:
            spool.add(host)
        return spool

    def add(self, host: HostDetail) -> None:
        """Keep a host nmap reported (one it found down is counted by the caller, not kept)."""
        self.count += 1
        opened = [(p.protocol, p.port) for p in host.ports if p.state == "open"]
        self.open_ports += len(opened)
        if opened:
            self.open_by_host[host.address] = opened
        if host.timed_out:
            self.timed_out.append(host.address)
        self._buffer.append(host)
        if len(self._buffer) >= self.buffer_hosts:
            self._seal()

    def with_hosts(self, hosts: Iterable[HostDetail]) -> HostSpool:
        """This spool and `hosts` (a stopped scan's hosts nmap had not finished), leaving this one as it was."""
        self._seal()
        spool = self._with_runs(list(self._runs))
        for host in hosts:
            spool.add(host)
        return spool

    def chunks(self) -> Iterator[Chunk]:
        """Every host in address order, in chunks: the runs laid end to end when they follow one
        another, else merged by address a chunk of each run at a time."""
        self._seal()
        if all(a[-1].last_key < b[0].first_key for a, b in pairwise(self._runs)):
            for run in self._runs:
                yield from run
            return
        merged = heapq.merge(*(self._run_hosts(run) for run in self._runs), key=lambda pair: pair[0])
        batch: list[HostDetail] = []
        for _, host in merged:
            batch.append(host)
            if len(batch) == CHUNK_HOSTS:
                yield from chunks_of(batch)
                batch = []
        yield from chunks_of(batch)

    def hosts(self) -> list[HostDetail]:
        """Every host, parsed, in address order: for a result small enough to hold whole."""
        return [host for chunk in self.chunks() for host in hosts_of(chunk)]

    def with_ports(self, detected: Mapping[tuple[str, str, int], PortDetail]) -> HostSpool:
        """This spool with each port that `detected` holds (by address, protocol, port) replaced
        by its entry there: a full scan's version detection. Only the chunks holding such a
        host are parsed and written again."""
        keys = sorted({address_key(address) for address, _, _ in detected})
        self._seal()
        return self._with_runs([[self._replace_ports(chunk, detected) if _holds_any(chunk, keys) else chunk
                                 for chunk in run] for run in self._runs])

    def _with_runs(self, runs: list[list[Chunk]]) -> HostSpool:
        """A sealed spool's counts with `runs` for its hosts: a copy that changes neither."""
        return replace(self, timed_out=list(self.timed_out), open_by_host=dict(self.open_by_host), _buffer=[],
                       _runs=runs)

    def _seal(self) -> None:
        if self._buffer:
            ordered = sorted(self._buffer, key=lambda host: address_key(host.address))
            self._runs.append(list(chunks_of(ordered)))
            self._buffer = []

    @staticmethod
    def _run_hosts(run: list[Chunk]) -> Iterator[tuple[str, HostDetail]]:
        for chunk in run:
            for host in hosts_of(chunk):
                yield address_key(host.address), host

    @staticmethod
    def _replace_ports(chunk: Chunk, detected: Mapping[tuple[str, str, int], PortDetail]) -> Chunk:
        hosts = [host.model_copy(update={"ports": [detected.get((host.address, p.protocol, p.port), p)
                                                   for p in host.ports]}) for host in hosts_of(chunk)]
        return next(chunks_of(hosts))


def _holds_any(chunk: Chunk, keys: list[str]) -> bool:
    """Whether any of the sorted `keys` falls within the chunk's span."""
    at = bisect.bisect_left(keys, chunk.first_key)
    return at < len(keys) and keys[at] <= chunk.last_key


class Piece(NamedTuple):
    """Consecutive bytes of nmap's XML, compressed, and how many characters they decode to."""

    chars: int
    data: bytes


@dataclass
class ReportSpool:
    """nmap's XML as it arrives (a full scan's two reports in turn), compressed PIECE_BYTES at a
    time, each piece cut before a byte that starts a character (or an invalid one), so that
    decoding pieces one by one gives the characters decoding it whole gives; with its size and
    SHA-256, the evidence of its exact bytes."""

    size: int = 0
    _open: bytearray = field(default_factory=bytearray)
    _pieces: list[Piece] = field(default_factory=list)
    _sha256: hashlib._Hash = field(default_factory=hashlib.sha256)

    def add(self, data: bytes) -> None:
        self.size += len(data)
        self._sha256.update(data)
        self._open += data
        while len(self._open) > PIECE_BYTES:
            self._cut(_boundary(self._open, PIECE_BYTES))

    def pieces(self) -> list[Piece]:
        """Every piece, the last one closed now (nothing more comes)."""
        if self._open:
            self._cut(len(self._open))
        return list(self._pieces)

    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def _cut(self, end: int) -> None:
        piece = bytes(self._open[:end])
        del self._open[:end]
        self._pieces.append(Piece(len(piece.decode("utf-8", "replace")), zlib.compress(piece)))


def _boundary(data: bytearray, limit: int) -> int:
    """Where to cut `data` at `limit` bytes at most: before a byte that is not a UTF-8
    continuation byte (at `limit` when there is nothing else but continuation bytes)."""
    end = limit
    while end > 0 and 0x80 <= data[end] < 0xC0:
        end -= 1
    return end or limit


@dataclass(frozen=True)
class ScanOutcome:
    """How a scan ended, as the store records it: its status, its result's head (counts,
    warnings, errors; None when nothing is kept), an error for the caller, its hosts and
    nmap's XML. Made in worker.py alone, by judging the facts of its runs."""

    status: TaskStatus
    result: ScanResult | None
    error: str | None
    hosts: HostSpool = field(default_factory=HostSpool)
    report: ReportSpool = field(default_factory=ReportSpool)

