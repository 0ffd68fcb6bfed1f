"""Parse a 10,000-host nmap report: this service's parser beside a plain ElementTree pass.

    .venv/bin/python bench/parse_10k.py [--hosts 10000] [--runs 5]

The report is built by replicating the host element of a real run (tests/fixtures/
rich_loopback.xml: -sV, -O and a script) under distinct addresses. Timings alternate
between parsers, medians of --runs; peak memory is tracemalloc's peak in a separate pass.
python-libnmap is measured too when it is installed (the parser it replaced).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmap_report import ReportParser  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "rich_loopback.xml"


def build_report(hosts: int) -> bytes:
    text = FIXTURE.read_text()
    start, end = text.index("<host "), text.index("</host>") + len("</host>")
    host = text[start:end]
    copies = [host.replace('addr="127.0.0.1"', f'addr="10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}"')
              for i in range(hosts)]
    return (text[:start] + "\n".join(copies) + text[end:]).encode()


def ours(data: bytes) -> int:
    parser = ReportParser()
    for offset in range(0, len(data), 65536):  # as nmap's stdout arrives
        parser.feed(data[offset:offset + 65536])
    parser.feed(b"\n")
    return len(parser.result("bench").model_dump()["hosts"])


def plain_elementtree(data: bytes) -> int:
    """The floor: one ElementTree parse, each host and port read into a dict."""
    root = ET.fromstring(data)
    hosts = []
    for host in root.iter("host"):
        address = host.find("address")
        ports = []
        for port in host.iter("port"):
            state, service = port.find("state"), port.find("service")
            ports.append({"port": int(port.get("portid", "0")), "protocol": port.get("protocol"),
                          "state": state.get("state") if state is not None else None,
                          "service": dict(service.attrib) if service is not None else {}})
        hosts.append({"address": address.get("addr") if address is not None else None, "ports": ports})
    return len(hosts)


def libnmap_parser() -> Callable[[bytes], int] | None:
    try:
        from libnmap.parser import NmapParser
    except ImportError:
        return None
    return lambda data: len(NmapParser.parse_fromstring(data.decode()).hosts)


def timed(fn: Callable[[bytes], int], data: bytes) -> float:
    started = time.perf_counter()
    fn(data)
    return time.perf_counter() - started


def peak_mib(fn: Callable[[bytes], Any], data: bytes) -> float:
    tracemalloc.start()
    fn(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    data = build_report(args.hosts)
    candidates = {"nmap_report (this service)": ours, "plain ElementTree": plain_elementtree}
    if (libnmap := libnmap_parser()) is not None:
        candidates["python-libnmap"] = libnmap
    counts = {name: fn(data) for name, fn in candidates.items()}
    assert set(counts.values()) == {args.hosts}, counts
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.runs):
        for name, fn in candidates.items():
            times[name].append(timed(fn, data))
    peaks = {name: peak_mib(fn, data) for name, fn in candidates.items()}
    per_k = args.hosts / 1000
    print(f"report: {args.hosts} hosts, {len(data) / 2**20:.1f} MiB of XML; medians of {args.runs} alternated runs")
    print(f"{'parser':28} {'median s':>9} {'ms/1k hosts':>12} {'peak MiB':>9} {'MiB/1k':>7}")
    for name in candidates:
        median = statistics.median(times[name])
        print(f"{name:28} {median:9.3f} {median * 1000 / per_k:12.1f} {peaks[name]:9.1f} {peaks[name] / per_k:7.2f}")
    base = "plain ElementTree"
    for name in candidates:
        if name != base:
            ratio_t = statistics.median(times[name]) / statistics.median(times[base])
            print(f"ratio {name} / {base}: time {ratio_t:.2f}x, peak memory {peaks[name] / peaks[base]:.2f}x")


if __name__ == "__main__":
    main()
