"""Scripts that would contact anything but the target are refused, and nmap proves it: the
scripts the server lets run ask no resolver, while fcrdns, left to itself, does despite -n."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from nmap_options import parse_command
from nse_policy import DEFAULT_CATEGORIES, ScriptPolicy, ScriptPolicyError, find_script_db, load_catalog
from scanner import build_argv
from tests.dns_jail import DnsListener, with_resolv_conf
from tests.support import Listeners

NMAP = shutil.which("nmap") or "/usr/bin/nmap"
CATALOG = load_catalog(find_script_db(NMAP, None))  # type: ignore[arg-type]
SCRIPTS = ScriptPolicy(catalog=CATALOG)
JAIL = "a mount namespace whose /etc/resolv.conf names a DNS server the test owns on port 53"


@pytest.fixture
def target(listeners: Listeners, dns_server: DnsListener) -> tuple[str, int]:
    """An address of 127.42.0.0/16 other than the resolver's, with a port open on it."""
    host = dns_server.address.rsplit(".", 1)[0] + (".1" if not dns_server.address.endswith(".1") else ".2")
    port = next(port for port in range(20000, 32768) if listeners.open(port, host))
    return host, port


def run_jailed(dns_server: DnsListener, directory: Path, argv: list[str]) -> None:
    subprocess.run([*with_resolv_conf(dns_server.resolv_conf(directory)), *argv], check=True, capture_output=True,
                   timeout=120)


@pytest.mark.requires_root(JAIL)
def test_fcrdns_asks_the_resolver_despite_dash_n(tmp_path: Path, dns_server: DnsListener,
                                                  target: tuple[str, int]) -> None:
    host, port = target
    run_jailed(dns_server, tmp_path, [NMAP, "-n", "-sT", "-Pn", "--unprivileged", "-p", str(port),
                                    "--script", "fcrdns", host])
    reverse = ".".join(reversed(host.split("."))) + ".in-addr.arpa"
    assert reverse in dns_server.names()


@pytest.mark.requires_root(JAIL)
def test_the_scripts_the_server_allows_ask_no_resolver(tmp_path: Path, dns_server: DnsListener,
                                                        target: tuple[str, int]) -> None:
    host, port = target
    command = f"--script {','.join(DEFAULT_CATEGORIES)} -Pn -p {port} {host}"
    parsed = parse_command(command, SCRIPTS, privileged=False)
    run_jailed(dns_server, tmp_path, build_argv(NMAP, parsed.options, parsed.targets, ipv6=False, privileged=False))
    assert dns_server.names() == []


@pytest.mark.parametrize(("script", "why"), [
    ("fcrdns", "asks the server's DNS resolver"),
    ("dns-srv-enum", "asks the server's DNS resolver"),
    ("resolveall", "resolves"),
    ("ip-forwarding", "asks the server's DNS resolver"),
    ("ftp-bounce", "scanme.nmap.org"),
    ("dns-client-subnet-scan", "name server"),
    ("bittorrent-discovery", "trackers"),
])
def test_scripts_that_contact_third_parties_are_refused_saying_why(script: str, why: str) -> None:
    with pytest.raises(ScriptPolicyError, match=f"script '{script}' is denied: .*{why}"):
        SCRIPTS.expression([script])


def test_a_script_the_operator_denied_says_so() -> None:
    narrow = ScriptPolicy(catalog=CATALOG, operator_denied=("banner",))
    with pytest.raises(ScriptPolicyError, match="script 'banner' is denied by this server's denied_scripts"):
        narrow.expression(["banner"])
