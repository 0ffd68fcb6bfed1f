"""findings.py: a scan's hosts held a buffer at a time and compressed into sorted chunks, and
nmap's XML compressed into pieces as it arrives, each giving back exactly what went in."""

from __future__ import annotations

import hashlib
import random
import zlib

from findings import CHUNK_HOSTS, PIECE_BYTES, HostSpool, ReportSpool, address_key, hosts_of
from models import HostDetail, PortDetail
from tests.nodes import big_result


def addresses(hosts: list[HostDetail]) -> list[str]:
    return [host.address for host in hosts]


def test_hosts_come_back_in_address_order_in_chunks_whatever_order_nmap_reported_them() -> None:
    hosts = big_result(1000).hosts
    shuffled = random.Random(7).sample(hosts, len(hosts))
    for reported in (hosts, shuffled, hosts[500:] + hosts[:500]):
        spool = HostSpool(buffer_hosts=100)
        for host in reported:
            spool.add(host)
        chunks = list(spool.chunks())
        assert addresses([h for chunk in chunks for h in hosts_of(chunk)]) == addresses(hosts)
        assert all(0 < chunk.host_count <= CHUNK_HOSTS for chunk in chunks), "no chunk holds more than a page reads"
        assert [(c.first_key, c.last_key) for c in chunks] == [
            (address_key(hosts_of(c)[0].address), address_key(hosts_of(c)[-1].address)) for c in chunks]
        assert spool.count == 1000 and spool.open_ports == sum(p.state == "open" for h in hosts for p in h.ports)


def test_a_spool_holds_no_more_than_its_buffer_parsed() -> None:
    spool = HostSpool(buffer_hosts=64)
    for host in big_result(640).hosts:
        spool.add(host)
        assert len(spool._buffer) < 64


def test_version_detection_rewrites_only_the_chunks_of_the_hosts_it_reported() -> None:
    hosts = big_result(300).hosts
    spool = HostSpool.of(hosts)
    target = hosts[130]
    port = target.ports[0]
    detected = {(target.address, port.protocol, port.port): port.model_copy(update={"service": "detected"})}
    before, after = list(spool.chunks()), list(spool.with_ports(detected).chunks())
    changed = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert changed == [130 // CHUNK_HOSTS]
    [replaced] = [h for chunk in after for h in hosts_of(chunk) if h.address == target.address]
    assert replaced.ports[0].service == "detected" and replaced.ports[1:] == target.ports[1:]


def test_hosts_added_to_a_copy_leave_the_spool_as_it_was() -> None:
    hosts = big_result(10).hosts
    spool = HostSpool.of(hosts[:5])
    partial = HostDetail(address="127.9.9.9", status="up", hostnames=[], partial=True,
                         ports=[PortDetail(port=22, protocol="tcp", state="open", service="")])
    more = spool.with_hosts([partial])
    assert addresses(more.hosts()) == [*addresses(hosts[:5]), "127.9.9.9"] and more.count == 6
    assert addresses(spool.hosts()) == addresses(hosts[:5]) and spool.count == 5
    assert more.open_by_host["127.9.9.9"] == [("tcp", 22)]


def test_the_report_comes_back_byte_for_byte_in_pieces_cut_between_characters() -> None:
    line = '<host name="é€"/>\n'.encode() + b"\xff"
    data = line * (3 * PIECE_BYTES // len(line))
    report = ReportSpool()
    for at in range(0, len(data), 65536 + 7):
        report.add(data[at: at + 65536 + 7])
    pieces = report.pieces()
    assert b"".join(zlib.decompress(piece.data) for piece in pieces) == data
    assert all(len(zlib.decompress(piece.data)) <= PIECE_BYTES for piece in pieces)
    assert len(pieces) >= -(-len(data) // PIECE_BYTES) > 1
    assert "".join(zlib.decompress(p.data).decode("utf-8", "replace") for p in pieces) == data.decode(
        "utf-8", "replace"), "no character split between pieces"
    assert [p.chars for p in pieces] == [len(zlib.decompress(p.data).decode("utf-8", "replace")) for p in pieces]
    assert report.size == len(data) and report.sha256() == hashlib.sha256(data).hexdigest()
