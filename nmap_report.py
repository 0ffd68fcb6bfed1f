"""nmap's XML report, parsed as it streams: complete, cut off, or still being written.

One incremental parser (stdlib ElementTree's XMLPullParser) serves every case: a finished
report, the hosts a running scan has finished so far, and the report of a scan that was
killed midway. Each `<host>` becomes a model and its elements are freed as it closes.
Alongside it, nmap's normal output is read for the open ports nmap announces the moment it
finds them, long before the XML holds their host: those hosts are shown `partial` until the
XML has them. Text that comes from targets (banners, product and version strings, script
output, PTR names) is stripped of control characters, bounded in length, and kept under
`untrusted`.
"""

from __future__ import annotations

import ipaddress
import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from findings import HostSpool, ReportSpool, address_key
from models import (
    AddressRecord,
    ExtraPorts,
    HostDetail,
    HostText,
    OsMatch,
    PortDetail,
    PortText,
    Progress,
    ScannedPorts,
    ScanResult,
    ScriptOutput,
)

RAW_CAP = 64 * 1024 * 1024
SCRIPT_OUTPUT_LIMIT = 2000
FIELD_LIMIT = 200
_INVALID_CHAR_REF = re.compile(r"&#([xX][0-9a-fA-F]+|[0-9]+);")
# How nmap (with -v, and -n: addresses only) announces an open port in its normal output as it
# finds it; NSE output there is indented ("| "), so no script can write such a line.
_ANNOUNCED = re.compile(rb"Discovered open port ([0-9]{1,5})/(tcp|udp|sctp) on ([0-9A-Fa-f.:]+)")
# No announcement is longer: of a longer line (script output, say) only this much is kept.
OUTPUT_LINE_LIMIT = 200


def clean_text(text: str, limit: int) -> str:
    """Target-controlled text made safe for an LLM: no control characters, bounded."""
    printable = text if text.isprintable() else "".join(ch if ch.isprintable() else " " for ch in text)
    return printable if len(printable) <= limit else printable[: limit - 1] + "…"


def _legal_char_ref(match: re.Match[str]) -> str:
    """Keep character references XML 1.0 allows; replace the rest (nmap 7.94 emits &#x1b;)."""
    code = int(match.group(1)[1:], 16) if match.group(1)[0] in "xX" else int(match.group(1))
    allowed = code in (0x9, 0xA, 0xD) or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0x10FFFF
    return match.group(0) if allowed and code not in (0xFFFE, 0xFFFF) else "\ufffd"


@dataclass
class RunStats:
    """nmap's closing `<runstats>`: present only when the report is complete."""

    elapsed: float = 0.0
    exit_status: str = ""
    errormsg: str = ""
    hosts_up: int = 0
    hosts_down: int = 0
    hosts_total: int = 0

    @classmethod
    def so_far(cls, hosts: Sequence[HostDetail], addresses: int, elapsed_s: float) -> RunStats:
        """Counts for a report nmap has not closed: the hosts it reported so far, of the
        `addresses` it was asked to scan, after `elapsed_s`."""
        return cls.counted(sum(h.status == "up" for h in hosts), sum(h.status == "down" for h in hosts),
                           len(hosts), addresses, elapsed_s)

    @classmethod
    def counted(cls, up: int, down: int, reported: int, addresses: int, elapsed_s: float) -> RunStats:
        """`so_far` from counts: `reported` hosts, `up` and `down` of them."""
        return cls(elapsed=round(elapsed_s, 2), hosts_up=up, hosts_down=down, hosts_total=max(addresses, reported))


class Findings(NamedTuple):
    """What a report holds, as the store keeps it: the result's head (no hosts) and its hosts."""

    head: ScanResult
    hosts: HostSpool


@dataclass
class ReportParser:
    """Feed nmap's XML (`feed`) and its normal output (`feed_output`) as they arrive; ask
    for what it found (`findings`, or `result` whole) at any time."""

    # The hosts the XML holds so far, compactly (findings.HostSpool; those nmap found down
    # only counted), and those finished since a live writer last took them (`take_recent`).
    found: HostSpool = field(default_factory=HostSpool)
    recent: list[HostDetail] = field(default_factory=list)
    up: int = 0
    down: int = 0
    reported: int = 0
    scanned: list[ScannedPorts] = field(default_factory=list)
    # nmap's own figures for the task it runs now (task_progress.TaskProgress puts them on the task's scale).
    progress: Progress | None = None
    runstats: RunStats | None = None
    complete: bool = False
    broken: bool = False
    # nmap's XML, compressed as it comes; a full scan's two runs share one (their reports in turn).
    raw: ReportSpool = field(default_factory=ReportSpool)
    size: int = 0
    truncated: bool = False
    _pending: bytes = b""
    _parser: ET.XMLPullParser[ET.Element] = field(default_factory=lambda: ET.XMLPullParser(events=("start", "end")))
    # The report's root (<nmaprun>), from which every element handled is let go.
    _root: ET.Element | None = None
    # Open ports announced in the normal output on hosts the XML does not hold yet, by address.
    _announced: dict[str, dict[tuple[str, int], None]] = field(default_factory=dict)
    _output_pending: bytes = b""
    _finished: set[str] = field(default_factory=set)

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of nmap's XML; parse every complete line in it."""
        if self.size + len(chunk) > RAW_CAP:
            self.truncated = True
            chunk = chunk[: max(RAW_CAP - self.size, 0)]
        self.size += len(chunk)
        self.raw.add(chunk)
        lines, _, self._pending = (self._pending + chunk).rpartition(b"\n")
        if lines and not self.broken:
            self._parse(lines + b"\n")

    def take_recent(self, count: int) -> None:
        """The first `count` of `recent` are written (or not wanted): let them go."""
        del self.recent[:count]

    def feed_output(self, chunk: bytes) -> None:
        """Take the next piece of nmap's normal output; note every open port it announces."""
        *lines, rest = (self._output_pending + chunk).split(b"\n")
        self._output_pending = rest[:OUTPUT_LINE_LIMIT]
        for line in lines:
            if match := _ANNOUNCED.fullmatch(line.rstrip(b"\r")):
                self._announce(match)

    def _announce(self, match: re.Match[bytes]) -> None:
        port, protocol, address = int(match.group(1)), match.group(2).decode(), match.group(3).decode()
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return
        # A host's report may be read first when both come at once: it has the last word.
        if 0 < port < 65536 and address not in self._finished:
            self._announced.setdefault(address, {})[(protocol, port)] = None

    def unconfirmed(self) -> list[HostDetail]:
        """The hosts nmap is still scanning, each with the open ports it announced so far
        (`partial`: no service or version yet, and more ports may come)."""
        return [
            HostDetail(address=address, status="up", hostnames=[], partial=True, ports=[
                PortDetail(port=port, protocol=protocol, state="open", service="")
                for protocol, port in sorted(ports)])
            for address, ports in self._announced.items()
        ]

    def _parse(self, data: bytes) -> None:
        text = _INVALID_CHAR_REF.sub(_legal_char_ref, data.decode("utf-8", "replace"))
        try:
            self._parser.feed(text)
            # Asked for "start" and "end" events only, each is (event, element); typeshed's
            # type also allows the shapes of namespace events, which never come here.
            for event, element in self._parser.read_events():  # type: ignore[misc]
                if event == "end":
                    self._handle(element)  # type: ignore[arg-type]
                elif self._root is None:
                    self._root = element  # type: ignore[assignment]
        except ET.ParseError:
            self.broken = True
        # What was handled is let go: the elements under the root (each host's, emptied as it
        # ended, and nmap's progress lines) otherwise stayed for the whole run (1.3 MB for
        # 16,384 hosts, more for a long run). One still open is kept by the parser, which goes
        # on filling it.
        if self._root is not None:
            del self._root[:]

    def _handle(self, element: ET.Element) -> None:
        if element.tag == "host":
            host = _host(element)
            self.reported += 1
            self.up += host.status == "up"
            self.down += host.status == "down"
            if host.status != "down":
                self.found.add(host)
                self.recent.append(host)
            self._finished.add(host.address)
            self._announced.pop(host.address, None)
            element.clear()  # done with it: what stays in the tree is an empty stub
        elif element.tag == "scaninfo":
            self.scanned.append(ScannedPorts(protocol=element.get("protocol", ""),
                                             services=element.get("services", "")))
        elif element.tag == "taskprogress":
            self.progress = _progress(element)
        elif element.tag == "taskbegin":
            self.progress = Progress(percent=0.0, phase=element.get("task", ""), remaining_s=None)
        elif element.tag == "runstats":
            self.runstats = _runstats(element)
        elif element.tag == "nmaprun":
            self.complete = True

    def findings(self, target: str, *, addresses: int = 0, elapsed_s: float = 0.0) -> Findings:
        """The hosts nmap finished and those it is still scanning (`unconfirmed`), with the
        run's statistics once nmap wrote them; until then the counts are those of the hosts
        so far, of the `addresses` nmap was asked to scan, and `elapsed_s` its time."""
        unconfirmed = self.unconfirmed()
        hosts = self.found.with_hosts(unconfirmed) if unconfirmed else self.found
        stats = self.runstats or RunStats.counted(self.up + len(unconfirmed), self.down,
                                                  self.reported + len(unconfirmed), addresses, elapsed_s)
        head = summary(target, stats, hosts.open_ports, hosts.timed_out, complete=self.complete)
        return Findings(head.model_copy(update={"scanned": self.scanned}) if self.scanned else head, hosts)

    def result(self, target: str, *, addresses: int = 0, elapsed_s: float = 0.0) -> ScanResult:
        """`findings` as one result, its hosts in it."""
        head, hosts = self.findings(target, addresses=addresses, elapsed_s=elapsed_s)
        return head.model_copy(update={"hosts": hosts.hosts()})


def build_result(target: str, hosts: list[HostDetail], stats: RunStats, *, complete: bool) -> ScanResult:
    """A result from hosts nmap reported, with `stats` (its own, or `RunStats.so_far`). Hosts
    it found down are counted, not listed: nmap lists them only with -v, which the server
    adds for its live output, not for them."""
    ordered = sorted((h for h in hosts if h.status != "down"), key=lambda host: address_key(host.address))
    head = summary(target, stats, sum(p.state == "open" for h in ordered for p in h.ports),
                   [h.address for h in ordered if h.timed_out], complete=complete)
    return head.model_copy(update={"hosts": ordered})


def summary(target: str, stats: RunStats, open_ports: int, timed_out: list[str], *, complete: bool) -> ScanResult:
    """A result's head: its counts, warnings and errors, no hosts."""
    timed_out = sorted(timed_out, key=address_key)
    return ScanResult(
        target=target,
        scan_time=stats.elapsed,
        hosts_up=stats.hosts_up,
        hosts_down=stats.hosts_down,
        hosts_total=stats.hosts_total,
        open_ports=open_ports,
        partial=not complete,
        warnings=[f"host {address} timed out before its scan finished" for address in timed_out],
        hosts=[],
        exit_status=stats.exit_status,
        errors=[clean_text(stats.errormsg, FIELD_LIMIT)] if stats.errormsg else [],
        hosts_timed_out=timed_out,
    )


def with_versions(discovery: Findings, versions: ScanResult, warning: str | None) -> Findings:
    """A two-phase scan's findings: the discovery's hosts and ports, each port that version
    detection (`versions`, whole) reported replaced by its report (service, product, version,
    CPE, scripts)."""
    detected = {(h.address, p.protocol, p.port): p for h in versions.hosts for p in h.ports}
    head = discovery.head.model_copy(update={
        "scan_time": round(discovery.head.scan_time + versions.scan_time, 2),
        "warnings": [*discovery.head.warnings, *versions.warnings, *([warning] if warning else [])],
        "errors": [*discovery.head.errors, *versions.errors],
    })
    return Findings(head, discovery.hosts.with_ports(detected))


def merge_results(target: str, parts: list[ScanResult], elapsed_s: float) -> ScanResult:
    """One result from the results of a scan's shards (each host appears in one shard): their
    hosts by address, their counts summed. Parts may come without their hosts (the heads of
    stored results, result_store.py): what is counted comes from their counts, not from hosts."""
    return ScanResult(
        target=target,
        scan_time=round(elapsed_s, 2),
        hosts_up=sum(p.hosts_up for p in parts),
        hosts_down=sum(p.hosts_down for p in parts),
        hosts_total=sum(p.hosts_total for p in parts),
        open_ports=sum(p.open_ports for p in parts),
        partial=any(p.partial for p in parts),
        warnings=[w for p in parts for w in p.warnings],
        hosts=sorted((h for p in parts for h in p.hosts), key=lambda host: address_key(host.address)),
        exit_status="success" if parts and all(p.exit_status == "success" for p in parts) else "",
        errors=[e for p in parts for e in p.errors],
        hosts_timed_out=[a for p in parts for a in p.hosts_timed_out],
        scanned=next((p.scanned for p in parts if p.scanned), []),
    )


def parse_report(xml: bytes | str, target: str) -> ScanResult:
    """Parse a whole XML report (complete or not) in one go."""
    parser = ReportParser()
    parser.feed(xml.encode() if isinstance(xml, str) else xml)
    parser.feed(b"\n")
    return parser.result(target)


def _host(element: ET.Element) -> HostDetail:
    status = element.find("status")
    addresses = [
        AddressRecord(
            address=a.get("addr", ""), type=a.get("addrtype", ""), vendor=clean_text(a.get("vendor", ""), 100)
        )
        for a in element.iter("address")
    ]
    ip = next((a.address for a in addresses if a.type in ("ipv4", "ipv6")), addresses[0].address if addresses else "")
    # With -n nmap names a host only by the names on its command line (type "user"); a PTR
    # name is whatever the reverse zone of the address says, so it goes with the target's text.
    names = [(clean_text(h.get("name", ""), 253), h.get("type", "")) for h in element.iter("hostname")]
    ptr = next((name for name, kind in names if kind == "PTR"), "")
    scripts = _scripts(element.find("hostscript"))
    uptime = element.find("uptime")
    distance = element.find("distance")
    ports_element = element.find("ports")
    return HostDetail(
        address=ip,
        status=status.get("state", "") if status is not None else "",
        reason=status.get("reason", "") if status is not None else "",
        hostnames=[name for name, kind in names if kind != "PTR"],
        addresses=addresses,
        ports=sorted((_port(p) for p in element.iter("port")), key=lambda p: (p.protocol, p.port)),
        extraports=[
            ExtraPorts(state=e.get("state", ""), count=int(e.get("count", "0")))
            for e in (ports_element.iter("extraports") if ports_element is not None else ())
        ],
        os_matches=[
            OsMatch(name=clean_text(m.get("name", ""), FIELD_LIMIT), accuracy=int(m.get("accuracy", "0")))
            for m in element.iter("osmatch")
        ],
        uptime_s=int(uptime.get("seconds", "0")) if uptime is not None else None,
        distance=int(distance.get("value", "0")) if distance is not None else None,
        untrusted=HostText(ptr=ptr, scripts=scripts) if ptr or scripts else None,
        timed_out=element.get("timedout") == "true",
    )


def _port(element: ET.Element) -> PortDetail:
    state = element.find("state")
    service = element.find("service")
    get = service.get if service is not None else (lambda _key, default="": default)
    # nmap's service name comes from its own databases; product, version, extra info and CPEs
    # are filled from the service's answers (the $1 of its match lines), scripts from theirs.
    # Most ports have none of them: no PortText is made for those (a third of a big scan's parse).
    product, version, extrainfo = get("product", ""), get("version", ""), get("extrainfo", "")
    cpes = list(service.iter("cpe")) if service is not None else []
    scripts = _scripts(element)
    text = PortText(
        product=clean_text(product, FIELD_LIMIT),
        version=clean_text(version, FIELD_LIMIT),
        extrainfo=clean_text(extrainfo, FIELD_LIMIT),
        cpe=[clean_text(c.text or "", FIELD_LIMIT) for c in cpes],
        scripts=scripts,
    ) if product or version or extrainfo or cpes or scripts else None
    return PortDetail(
        port=int(element.get("portid", "0")),
        protocol=element.get("protocol", ""),
        state=state.get("state", "") if state is not None else "",
        reason=state.get("reason", "") if state is not None else "",
        service=service_name(clean_text(get("name", ""), 64), tunnel := clean_text(get("tunnel", ""), 16)),
        tunnel=tunnel,
        untrusted=text if text is not None and any(text.texts()) else None,
    )


def service_name(name: str, tunnel: str) -> str:
    """The service as nmap's own console names it: `ssl/http` for HTTP inside TLS. The XML
    keeps the tunnel in an attribute of its own, and a view that showed `http` alone would have
    an agent report plain HTTP on port 443."""
    return f"{tunnel}/{name}" if tunnel and name else name


def _scripts(parent: ET.Element | None) -> list[ScriptOutput]:
    if parent is None:
        return []
    return [
        ScriptOutput(id=s.get("id", ""), output=clean_text(s.get("output", ""), SCRIPT_OUTPUT_LIMIT))
        for s in parent.findall("script")
    ]


def _progress(element: ET.Element) -> Progress:
    remaining = element.get("remaining")
    return Progress(
        percent=float(element.get("percent", "0")),
        phase=element.get("task", ""),
        remaining_s=int(remaining) if remaining and remaining.isdigit() else None,
    )


def _runstats(element: ET.Element) -> RunStats:
    finished = element.find("finished")
    hosts = element.find("hosts")
    get = finished.get if finished is not None else (lambda _key, default="": default)
    count = hosts.get if hosts is not None else (lambda _key, default="0": default)
    return RunStats(
        elapsed=float(get("elapsed", "0") or 0),
        exit_status=get("exit", ""),
        errormsg=get("errormsg", ""),
        hosts_up=int(count("up", "0")),
        hosts_down=int(count("down", "0")),
        hosts_total=int(count("total", "0")),
    )
