"""Answers say what nmap's console would have said: a service inside TLS is `ssl/http` in
every view and in the inventory, and hosts reported down after host discovery come with the
reason a firewall may be behind it and the way around it."""

from __future__ import annotations

import contextlib
import csv
import io
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from nmap_report import parse_report
from tests.conftest import OpenClient
from tests.namespaces import FirewalledHost, firewalled_host
from tests.receivers import tls_certificate
from tests.support import answer_of, free_port

pytestmark = pytest.mark.anyio
HTTPS_ADDRESS = "127.53.1.1"


class Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html><title>hello</title></html>"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        """Quiet: nmap's probes would fill the test's output."""


@contextlib.contextmanager
def https_listener(directory: Path) -> Iterator[int]:
    """An HTTP server inside TLS on HTTPS_ADDRESS (a certificate of its own); its port."""
    certificate, key = tls_certificate(directory, "tls.test")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate, key)
    server = ThreadingHTTPServer((HTTPS_ADDRESS, free_port(HTTPS_ADDRESS)), Hello)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_parser_writes_the_tunnel_into_the_service_name() -> None:
    xml = (b'<nmaprun><host><status state="up"/><address addr="127.0.0.1" addrtype="ipv4"/><ports>'
           b'<port protocol="tcp" portid="443"><state state="open"/><service name="http" tunnel="ssl"/></port>'
           b'<port protocol="tcp" portid="80"><state state="open"/><service name="http"/></port>'
           b'</ports></host></nmaprun>')
    [host] = parse_report(xml, "127.0.0.1").hosts
    assert [(p.port, p.service, p.tunnel) for p in host.ports] == [(80, "http", ""), (443, "ssl/http", "ssl")]


async def test_a_service_inside_tls_is_ssl_http_in_every_view_and_the_inventory(
    in_memory: OpenClient, tmp_path: Path
) -> None:
    """nmap's console says `ssl/http`; the summary, CSV and inventory said `http`, so an agent
    reported plain HTTP on an encrypted port."""
    with https_listener(tmp_path) as port:
        async with in_memory() as alice:
            done = await answer_of(alice, "custom_scan", command=f"-sV -p {port} {HTTPS_ADDRESS}", timeout=120)
            task_id = done["task_id"]
            full = await answer_of(alice, "get_task_result", task_id=task_id, view="full")
            table = await answer_of(alice, "get_task_result", task_id=task_id, format="csv")
            found = await answer_of(alice, "find_hosts", service="ssl/http")
            counted = await answer_of(alice, "top_values", field="service")
    assert done["status"] == "completed", done
    [summary] = done["result"]["hosts"][0]["ports"]
    [detail] = full["result"]["hosts"][0]["ports"]
    [row] = csv.DictReader(io.StringIO(table["content"]))
    assert (summary["service"], detail["service"], detail["tunnel"], row["service"]) == (
        "ssl/http", "ssl/http", "ssl", "ssl/http")
    assert [(h["address"], [p["service"] for p in h["ports"]]) for h in found["hosts"]] == [
        (HTTPS_ADDRESS, ["ssl/http"])]
    assert counted["values"] == [{"value": "ssl/http", "hosts": 1}]


@pytest.fixture
def behind_a_firewall(tmp_path: Path) -> Iterator[FirewalledHost]:
    """A host whose firewall drops nmap's unprivileged ping probes (TCP 80 and 443) only."""
    with firewalled_host(tmp_path) as host:
        host.drop("80, 443")
        yield host


@pytest.mark.requires_root("a network namespace with an nftables rule (a host behind a firewall)")
async def test_a_host_that_drops_ping_probes_is_said_to_be_maybe_firewalled_and_can_be_scanned_anyway(
    in_memory: OpenClient, behind_a_firewall: FirewalledHost
) -> None:
    """nmap's console says "Host seems down. If it is really up, but blocking our ping probes,
    try -Pn"; its XML does not, and quick_scan and full_scan had no way to skip discovery."""
    host = behind_a_firewall
    async with in_memory(nmap_path=str(host.nmap)) as alice:
        down = await answer_of(alice, "custom_scan", command=f"-p {host.port} {host.address}", timeout=60)
        table = await answer_of(alice, "get_task_result", task_id=down["task_id"], format="csv")
        quick = await answer_of(alice, "quick_scan", target=host.address, timeout=120)
        anyway = await answer_of(alice, "custom_scan", command=f"-Pn -p {host.port} {host.address}", timeout=60)
        skipped = await answer_of(alice, "quick_scan", target=host.address, skip_host_discovery=True, timeout=120)
    assert (down["result"]["hosts_down"], down["result"]["hosts"]) == (1, []), down
    [hint] = down["result"]["warnings"]
    assert hint.startswith("1 of 1 hosts did not answer host discovery (TCP connections to ports 80 and 443)")
    assert "skip_host_discovery=true" in hint and "-Pn (custom_scan)" in hint
    assert hint in (table["message"] or ""), "csv answers say it too"
    assert quick["result"]["hosts_down"] == 1 and quick["result"]["warnings"] == [hint]
    for scanned in (anyway, skipped):
        assert scanned["result"]["hosts_down"] == 0 and scanned["result"]["warnings"] == [], scanned
    assert [(p["port"], p["state"]) for p in anyway["result"]["hosts"][0]["ports"]] == [(host.port, "open")]
    assert skipped["result"]["hosts"][0]["status"] == "up"
