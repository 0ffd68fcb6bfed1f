"""python-libnmap as an oracle for nmap_report: given the same nmap output, both must agree.

Each case is parsed by nmap_report.parse_report and by libnmap's NmapParser, and every field
both parsers expose is compared, host by host and port by port. Where nmap_report differs from
libnmap on purpose, the difference is one method of `Deliberate`; any other disagreement fails.
The cases are every recorded fixture, two variants of them for what no loopback run can
produce, and one live nmap run for host scripts (no recorded fixture has one).
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import subprocess
from pathlib import Path
from typing import TypeVar

import pytest
from libnmap.objects import NmapHost, NmapReport, NmapService
from libnmap.parser import NmapParser

from models import HostDetail, HostText, PortDetail, PortText
from nmap_report import FIELD_LIMIT, SCRIPT_OUTPUT_LIMIT, clean_text, parse_report
from tests.support import free_port, with_lan_elements

FIXTURES = Path(__file__).parent / "fixtures"
RECORDED = sorted(path.name for path in FIXTURES.glob("*.xml"))
LAN = "rich_loopback.xml with a MAC address, its vendor and a PTR name edited in"
CUT = "killed_midway.xml cut inside its last host"
LIVE = "live run: a host script, two hosts given out of address order"
CASES = [*RECORDED, LAN, CUT, LIVE]
NMAP = shutil.which("nmap") or "/usr/bin/nmap"

HOST_FIELDS = {"address", "status", "ip", "mac", "mac vendor", "hostnames", "host scripts", "os matches", "uptime",
               "distance", "ports"}
PORT_FIELDS = {"state", "reason", "service", "product", "version", "extrainfo", "cpe", "scripts"}
# Fields no recorded fixture can exercise: loopback has no link layer (no MAC, so no vendor),
# the recorder runs nmap with -n (no names), and its scripts are port scripts. The LAN and LIVE
# cases exercise them; if a fixture is ever recorded with one, move it out of this set.
NOT_IN_RECORDED = {"mac", "mac vendor", "hostnames", "host scripts"}
# nmap_report's bounds on target-controlled text, per field.
VENDOR_LIMIT, HOSTNAME_LIMIT, SERVICE_LIMIT = 100, 253, 64

# nmap runs a hostrule script on every host; its output has a newline and is longer than
# nmap_report keeps, so the live case shows the cleaning on real nmap output.
HOST_SCRIPT = f"""\
description = "Host script for the libnmap oracle test"
categories = {{"safe"}}
hostrule = function() return true end
action = function() return "first line\\nsecond line " .. string.rep("x", {SCRIPT_OUTPUT_LIMIT}) end
"""

Fields = dict[tuple[str, str], object]
T = TypeVar("T")


class Deliberate:
    """nmap_report's deliberate differences from python-libnmap, one method each.

    Each method takes what libnmap gives and returns what nmap_report gives on purpose (the one
    exception, `unmeasured_as_zero`, says why it goes the other way). `used` collects the names
    of the methods that changed a value, so a test can show that each one is still needed.
    """

    def __init__(self) -> None:
        self.used: set[str] = set()

    def _note(self, name: str, before: object, after: T) -> T:
        if before != after:
            self.used.add(name)
        return after

    def complete_hosts_only(self, text: str) -> str:
        """A killed scan keeps the hosts nmap finished: nmap_report parses a cut-off report up to
        its last complete <host>, where libnmap (whose incomplete=True only appends </nmaprun>)
        rejects the whole report once the cut falls inside a host."""
        starts = [match.start() for match in re.finditer(r"<host[ >]", text)]
        cut = starts[-1] if starts and starts[-1] > text.rfind("</host>") else len(text)
        return self._note("complete_hosts_only", text, text[:cut])

    def sorted_hosts(self, hosts: list[NmapHost]) -> list[NmapHost]:
        """Hosts in numeric address order (127.0.0.9 before 127.0.0.10) rather than nmap's target
        order, so pages and diffs of the same network list its hosts the same way every time."""
        ordered = sorted(hosts, key=lambda h: (ipaddress.ip_address(h.address).version,
                                               int(ipaddress.ip_address(h.address))))
        self._note("sorted_hosts", [h.address for h in hosts], [h.address for h in ordered])
        return ordered

    def absent_is_empty(self, value: str | None) -> str:
        """An attribute nmap left out is '' in nmap_report and None in libnmap: every text field
        is always a str, so JSON and csv consumers need no null checks."""
        return self._note("absent_is_empty", value, value or "")

    def cleaned(self, text: str, limit: int) -> str:
        """Text that comes from targets (banners, names, script output) loses its control
        characters and is bounded, so a hostile target cannot steer a terminal or flood an LLM's
        context; libnmap passes it on verbatim."""
        return self._note("cleaned", text, clean_text(text, limit))

    def unmeasured_as_zero(self, ours: object) -> object:
        """libnmap says 0 for an uptime or distance nmap did not report; nmap_report says None,
        because distance 0 is a real answer (the target is this machine) that absence must not
        look like. libnmap's 0 cannot tell the two apart, so this maps our side to its form."""
        return self._note("unmeasured_as_zero", ours, 0 if ours is None else ours)


def report_bytes(case: str, live: bytes) -> bytes:
    """The nmap output of one case: a recorded fixture, a variant of one, or the live run."""
    if case == LAN:
        return with_lan_elements((FIXTURES / "rich_loopback.xml").read_bytes())
    if case == CUT:
        killed = (FIXTURES / "killed_midway.xml").read_bytes()
        return killed[: killed.rindex(b"<ports>")]
    return live if case == LIVE else (FIXTURES / case).read_bytes()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """One real nmap run on loopback with a host script, its targets out of address order."""
    script = tmp_path_factory.mktemp("nse") / "oracle-host.nse"
    script.write_text(HOST_SCRIPT)
    argv = [NMAP, "-sT", "-n", "-p", str(free_port()), "--script", str(script), "-oX", "-", "--unprivileged",
            "--", "127.0.0.10", "127.0.0.9"]
    return subprocess.run(argv, capture_output=True, check=True, timeout=120).stdout


def our_fields(data: bytes) -> Fields:
    """What nmap_report makes of the report, keyed by (host or port, field)."""
    result = parse_report(data, "oracle")
    fields: Fields = {("report", "hosts"): [h.address for h in result.hosts]}
    for host in result.hosts:
        fields.update(_our_host(host))
        for port in host.ports:
            fields.update(_our_port(f"{host.address} {port.protocol}/{port.port}", port))
    return fields


def _our_host(host: HostDetail) -> Fields:
    text = host.untrusted or HostText()
    fields = {
        "address": host.address,
        "status": host.status,
        "ip": [a.address for a in host.addresses if a.type in ("ipv4", "ipv6")],
        "mac": [a.address for a in host.addresses if a.type == "mac"],
        "mac vendor": next((a.vendor for a in host.addresses if a.type == "mac"), ""),
        # nmap_report keeps a PTR name apart, with the target's text; libnmap cannot tell a name's
        # type, so every name nmap reported is compared.
        "hostnames": [*host.hostnames, *([text.ptr] if text.ptr else [])],
        "host scripts": [(s.id, s.output) for s in text.scripts],
        "os matches": [(m.name, m.accuracy) for m in host.os_matches],
        "uptime": host.uptime_s,
        "distance": host.distance,
        "ports": [f"{p.protocol}/{p.port}" for p in host.ports],
    }
    return {(host.address, name): value for name, value in fields.items()}


def _our_port(where: str, port: PortDetail) -> Fields:
    text = port.untrusted or PortText()
    fields = {
        "state": port.state,
        "reason": port.reason,
        "service": port.service,
        "product": text.product,
        "version": text.version,
        "extrainfo": text.extrainfo,
        "cpe": text.cpe,
        "scripts": [(s.id, s.output) for s in text.scripts],
    }
    return {(where, name): value for name, value in fields.items()}


def libnmap_fields(data: bytes, deliberate: Deliberate) -> Fields:
    """What python-libnmap makes of the same report, with the deliberate differences applied."""
    text = data.decode()
    report: NmapReport = (
        NmapParser.parse_fromstring(text) if "</nmaprun>" in text
        else NmapParser.parse_fromstring(deliberate.complete_hosts_only(text), incomplete=True)
    )
    hosts = deliberate.sorted_hosts(report.hosts)
    fields: Fields = {("report", "hosts"): [h.address for h in hosts]}
    for host in hosts:
        fields.update(_libnmap_host(host, deliberate))
        for service in host.services:
            fields.update(_libnmap_port(f"{host.address} {service.protocol}/{service.port}", service, deliberate))
    return fields


def _libnmap_host(host: NmapHost, deliberate: Deliberate) -> Fields:
    fields = {
        "address": host.address,
        "status": host.status,
        "ip": [address for address in (host.ipv4, host.ipv6) if address],
        "mac": [host.mac] if host.mac else [],
        "mac vendor": deliberate.cleaned(host.vendor, VENDOR_LIMIT),
        "hostnames": [deliberate.cleaned(name, HOSTNAME_LIMIT) for name in host.hostnames],
        "host scripts": [(s["id"], deliberate.cleaned(s["output"], SCRIPT_OUTPUT_LIMIT)) for s in host.scripts_results],
        "os matches": [(deliberate.cleaned(m.name, FIELD_LIMIT), m.accuracy) for m in host.os_match_probabilities()],
        "uptime": host.uptime,
        "distance": host.distance,
        "ports": [f"{s.protocol}/{s.port}" for s in host.services],
    }
    return {(host.address, name): value for name, value in fields.items()}


def _libnmap_port(where: str, service: NmapService, deliberate: Deliberate) -> Fields:
    attributes = service.service_dict
    product, version, extrainfo = (
        deliberate.cleaned(deliberate.absent_is_empty(attributes.get(name)), FIELD_LIMIT)
        for name in ("product", "version", "extrainfo")
    )
    fields = {
        "state": service.state,
        "reason": service.reason,
        "service": deliberate.cleaned(service.service, SERVICE_LIMIT),
        "product": product,
        "version": version,
        "extrainfo": extrainfo,
        "cpe": [deliberate.cleaned(cpe.cpestring, FIELD_LIMIT) for cpe in service.cpelist],
        "scripts": [(s["id"], deliberate.cleaned(s["output"], SCRIPT_OUTPUT_LIMIT)) for s in service.scripts_results],
    }
    return {(where, name): value for name, value in fields.items()}


def disagreements(case: str, data: bytes, deliberate: Deliberate) -> list[str]:
    """One line per field the two parsers disagree on, after the deliberate differences."""
    ours = {key: deliberate.unmeasured_as_zero(value) if key[1] in ("uptime", "distance") else value
            for key, value in our_fields(data).items()}
    theirs = libnmap_fields(data, deliberate)
    return [
        f"{case}: {where}: {name}: nmap_report {ours.get((where, name), '<absent>')!r}, "
        f"libnmap {theirs.get((where, name), '<absent>')!r}"
        for where, name in sorted(ours.keys() | theirs.keys())
        if ours.get((where, name), "<absent>") != theirs.get((where, name), "<absent>")
    ]


@pytest.mark.parametrize("case", CASES)
def test_nmap_report_agrees_with_libnmap(case: str, live: bytes) -> None:
    mismatches = disagreements(case, report_bytes(case, live), Deliberate())
    assert not mismatches, "\n".join(mismatches)


def test_every_compared_field_and_every_deliberate_difference_is_exercised(live: bytes) -> None:
    exercised: dict[str, set[str]] = {}
    deliberate = Deliberate()
    for case in CASES:
        data = report_bytes(case, live)
        disagreements(case, data, deliberate)
        for (_, name), value in our_fields(data).items():
            if value not in (None, "", []):
                exercised.setdefault(name, set()).add(case)
    compared = {name for case in CASES for _, name in our_fields(report_bytes(case, live))}
    assert compared == {"hosts"} | HOST_FIELDS | PORT_FIELDS
    assert not compared - exercised.keys(), f"compared but empty in every case: {compared - exercised.keys()}"
    recorded_gaps = {name for name in compared if not exercised[name] & set(RECORDED)}
    assert recorded_gaps == NOT_IN_RECORDED, f"exercised by no recorded fixture: {recorded_gaps}"
    declared = {name for name in vars(Deliberate) if not name.startswith("_")}
    assert deliberate.used == declared, f"deliberate differences no case needs: {declared - deliberate.used}"
