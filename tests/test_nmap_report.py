"""nmap_report.py on XML recorded from real nmap runs (tests/fixtures/record.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from nmap_report import ReportParser, clean_text, parse_report
from tests.support import with_lan_elements

FIXTURES = Path(__file__).parent / "fixtures"
PORTS = json.loads((FIXTURES / "ports.json").read_text())


def fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def test_version_detection_scripts_and_os_details() -> None:
    result = parse_report(fixture("rich_loopback.xml"), "127.0.0.1")
    [host] = result.hosts
    assert (host.address, host.status, host.reason) == ("127.0.0.1", "up", "localhost-response")
    assert [(a.address, a.type) for a in host.addresses] == [("127.0.0.1", "ipv4")]
    ssh, closed = host.ports
    assert (ssh.port, ssh.protocol, ssh.state, ssh.reason) == (PORTS["banner"], "tcp", "open", "syn-ack")
    text = ssh.untrusted
    assert ssh.service == "ssh" and text is not None and not ssh.suspicious
    assert (text.product, text.version) == ("OpenSSH", "9.2p1 Debian 2+deb12u3") and text.extrainfo == "protocol 2.0"
    assert text.described() == "OpenSSH 9.2p1 Debian 2+deb12u3"
    assert text.cpe == ["cpe:/a:openbsd:openssh:9.2p1", "cpe:/o:linux:linux_kernel"]
    assert [(s.id, s.output) for s in text.scripts] == [("banner", "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3")]
    assert (closed.port, closed.state, closed.reason, closed.untrusted) == (PORTS["closed"], "closed", "reset", None)
    assert host.os_matches and host.os_matches[0].name.startswith("Linux") and host.os_matches[0].accuracy > 80
    assert host.uptime_s is not None and host.distance == 0
    assert host.timed_out is False


def test_run_statistics_and_summaries() -> None:
    result = parse_report(fixture("quick_loopback.xml"), "127.0.0.1")
    assert (result.hosts_up, result.hosts_down, result.hosts_total) == (1, 0, 1)
    assert result.exit_status == "success" and not result.partial and result.errors == []
    assert result.scan_time > 0
    [host] = result.hosts
    assert host.extraports and host.extraports[0].state == "closed"
    assert host.extraports[0].count + len(host.ports) == 100
    assert set(PORTS["quick_open"]) <= {p.port for p in host.ports if p.state == "open"}
    assert result.open_ports == sum(p.state == "open" for p in host.ports)


def test_a_multi_host_range_is_sorted_by_address() -> None:
    result = parse_report(fixture("multi_host.xml"), "127.0.0.1-8")
    assert [h.address for h in result.hosts] == [f"127.0.0.{i}" for i in range(1, 9)]
    assert result.hosts_up == result.hosts_total == 8
    opened = [h.address for h in result.hosts if any(p.port == PORTS["multi"] and p.state == "open" for p in h.ports)]
    assert opened == ["127.0.0.3"]


def test_host_timeouts_are_reported() -> None:
    result = parse_report(fixture("host_timeout.xml"), "127.0.0.1")
    assert result.hosts[0].timed_out and result.hosts_timed_out == ["127.0.0.1"]
    assert result.warnings


def test_a_killed_run_gives_the_hosts_finished_so_far() -> None:
    result = parse_report(fixture("killed_midway.xml"), "127.0.0.1-8")
    assert result.partial and result.exit_status == ""
    assert [h.address for h in result.hosts] == ["127.0.0.1", "127.0.0.2"]
    assert all(h.extraports for h in result.hosts)


def test_progress_is_read_as_the_report_streams() -> None:
    data = fixture("killed_midway.xml")
    report = ReportParser()
    seen = []
    for start in range(0, len(data), 97):
        report.feed(data[start:start + 97])
        if report.progress is not None and (not seen or seen[-1] != report.progress):
            seen.append(report.progress)
    assert seen and seen[0].phase
    assert any(p.percent > 0 for p in seen)
    assert len(report.result("x").hosts) == 2


def test_feeding_in_tiny_chunks_gives_the_same_result() -> None:
    data = fixture("rich_loopback.xml")
    whole = parse_report(data, "t")
    report = ReportParser()
    for start in range(0, len(data), 7):
        report.feed(data[start:start + 7])
    report.feed(b"\n")
    assert report.result("t") == whole and report.complete


def test_target_text_is_cleaned_and_bounded() -> None:
    hostile = fixture("rich_loopback.xml").replace(
        b'output="SSH-2.0', b'output="&#x1b;[2J&#x7;' + b"A" * 5000 + b" SSH-2.0"
    )
    [ssh, _] = parse_report(hostile, "t").hosts[0].ports
    assert ssh.untrusted is not None
    output = ssh.untrusted.scripts[0].output
    assert len(output) == 2000 and "\x1b" not in output and "\x07" not in output
    assert clean_text("ok\x00\x1b[2Jbanner\r\n", 100) == "ok  [2Jbanner  "


def test_zero_hosts_and_no_report() -> None:
    assert parse_report(fixture("no_targets.xml"), "x").hosts_total == 0
    empty = parse_report(b"", "x")
    assert empty.partial and empty.hosts == []
    garbage = ReportParser()
    garbage.feed(b"<nmaprun><host></nmaprun>\n")
    assert garbage.broken and garbage.result("x").hosts == []


def test_mac_addresses_with_vendor_and_ptr_names() -> None:
    host = parse_report(with_lan_elements(fixture("rich_loopback.xml")), "t").hosts[0]
    assert [(a.address, a.type, a.vendor) for a in host.addresses] == [
        ("127.0.0.1", "ipv4", ""), ("52:54:00:12:34:56", "mac", "QEMU virtual NIC")]
    assert host.address == "127.0.0.1" and host.untrusted is not None and host.untrusted.ptr == "gw.example.lan"
    assert host.hostnames == [], "a PTR name is the reverse zone's word: kept with the target's text"


def announcing(*lines: str) -> bytes:
    """nmap's normal output with these lines among others, as -v writes it."""
    return "\n".join(["Initiating Connect Scan at 13:36", *lines, "Stats: 0:00:02 elapsed", ""]).encode()


def test_open_ports_nmap_announces_show_their_host_as_partial_until_the_xml_reports_it() -> None:
    data = fixture("multi_host.xml")
    third = [match.start() for match in re.finditer(rb"<host ", data)][2]  # 127.0.0.3's report
    report = ReportParser()
    report.feed(data[:third])
    report.feed_output(announcing(f"Discovered open port {PORTS['multi']}/tcp on 127.0.0.3"))
    running = report.result("127.0.0.1-8", addresses=8, elapsed_s=1.5)
    assert running.partial and [h.address for h in running.hosts] == ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    [announced] = [h for h in running.hosts if h.partial]
    assert (announced.address, announced.status) == ("127.0.0.3", "up")
    assert [(p.port, p.protocol, p.state, p.service) for p in announced.ports] == [(PORTS["multi"], "tcp", "open", "")]
    assert (running.hosts_up, running.hosts_total, running.scan_time, running.open_ports) == (3, 8, 1.5, 1)
    report.feed(data[third:])
    # Read from two pipes, a line may come after the report of its host, which has the last word.
    report.feed_output(announcing(f"Discovered open port {PORTS['multi']}/tcp on 127.0.0.3"))
    done = report.result("127.0.0.1-8")
    assert report.unconfirmed() == [] and not any(h.partial for h in done.hosts)
    assert done == parse_report(data, "127.0.0.1-8"), "once nmap reports the host, its report alone counts"


def test_only_nmap_s_own_announcements_count() -> None:
    report = ReportParser()
    announcement = "Discovered open port 2222/tcp on ::1"
    report.feed_output(announcing(
        "|_http-title: Discovered open port 9/tcp on 127.0.0.9",  # script output is indented
        "Discovered open port 70000/tcp on 127.0.0.9", "Discovered open port 22/tcp on example.com",
        "Discovered open port 22/tcp on 127.0.0.9 and more", "x" * 5000 + "Discovered open port 23/tcp on 127.0.0.9",
        "Discovered open port 53/udp on 127.0.0.7\r"))
    report.feed_output(announcement[:17].encode())  # a line may arrive in pieces
    report.feed_output(announcement[17:].encode() + b"\n")
    assert {(h.address, p.port, p.protocol) for h in report.unconfirmed() for p in h.ports} == {
        ("127.0.0.7", 53, "udp"), ("::1", 2222, "tcp")}


def test_hosts_nmap_found_down_are_counted_not_listed() -> None:
    # nmap lists them only with -v; this element is one such, from a real run of -sT -v.
    down = (b'<host><status state="down" reason="net-unreach" reason_ttl="0"/>\n'
            b'<address addr="10.77.1.1" addrtype="ipv4"/>\n<hostnames>\n</hostnames>\n</host>\n')
    data = fixture("multi_host.xml")
    cut = data[:data.index(b"<runstats>")]
    result = parse_report(cut.replace(b"<host ", down + b"<host ", 1), "x")
    assert len(result.hosts) == 8 and "10.77.1.1" not in {h.address for h in result.hosts}
    assert (result.hosts_up, result.hosts_down, result.hosts_total) == (8, 1, 9)
