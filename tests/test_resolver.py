"""Hostname lookups: each token within its share of a pool of their own, cached briefly, and
none at all for a name the policy refuses (counted at a DNS server the test owns)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from resolver import CACHE_ENTRIES, LOOKUPS_PER_CALLER, NEGATIVE_TTL_S, POSITIVE_TTL_S, HostResolver
from targets import IPAddress, TargetError
from tests.dns_jail import DnsListener, with_resolv_conf
from tests.support import ALICE, BOB, ROOT, LiveServer, call_tool, error_text, eventually, failure_of, write_config

pytestmark = pytest.mark.anyio

NMAP = shutil.which("nmap") or "/usr/bin/nmap"
JAIL = "a mount namespace whose /etc/resolv.conf names a DNS server the test owns on port 53"


class Blocking:
    """A blocking lookup, as getaddrinfo is: names starting `hang` wait until `let_go` lets
    them (then fail as a silent DNS server's do), names starting `missing` do not exist,
    others answer 10.1.1.1 at once."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self._lock = threading.Lock()
        self._held: dict[str, threading.Event] = {}
        self._all_let_go = False

    def let_go(self, *hostnames: str) -> None:
        """End the hanging lookups of `hostnames`, or of every name (none given)."""
        with self._lock:
            self._all_let_go = self._all_let_go or not hostnames
            for name in hostnames or list(self._held):
                self._held.setdefault(name, threading.Event()).set()

    def __call__(self, hostname: str) -> tuple[IPAddress, ...]:
        self.asked.append(hostname)
        if hostname.startswith("hang"):
            with self._lock:
                held = self._held.setdefault(hostname, threading.Event())
                if self._all_let_go:
                    held.set()
            held.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        if hostname.startswith("missing"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return (ipaddress.ip_address("10.1.1.1"),)


@pytest.fixture
def blocking() -> Iterator[Blocking]:
    lookup = Blocking()
    yield lookup
    lookup.let_go()


async def test_a_tokens_hung_lookups_leave_another_token_its_threads(blocking: Blocking) -> None:
    resolver = HostResolver(2, 1.0, lookup=blocking)
    hung = [asyncio.create_task(failure_of(resolver.addresses("alice", f"hang-{i}.example"))) for i in range(12)]
    assert await eventually(lambda: len(blocking.asked) == LOOKUPS_PER_CALLER, 10)
    assert await resolver.addresses("bob", "fast.example") == (ipaddress.ip_address("10.1.1.1"),)
    refusals = [str(e) for e in await asyncio.gather(*hung)]
    assert sum("took more than 1 s" in r for r in refusals) == LOOKUPS_PER_CALLER
    assert sum("this token's 2 lookups under way have not ended within 1 s" in r for r in refusals) == 10
    assert len(blocking.asked) == LOOKUPS_PER_CALLER + 1
    resolver.close()


async def test_a_lookup_holds_its_slot_until_its_thread_returns(blocking: Blocking) -> None:
    resolver = HostResolver(1, 2.0, lookup=blocking)
    gave_up = await asyncio.gather(*(failure_of(resolver.addresses("alice", f"hang-{i}.example")) for i in range(2)))
    assert all("took more than 2 s" in str(e) for e in gave_up)
    # Its caller gave up, but both threads still wait for the DNS server: no third one starts.
    assert "under way have not ended" in str(await failure_of(resolver.addresses("alice", "fast.example")))
    assert blocking.asked == ["hang-0.example", "hang-1.example"]
    blocking.let_go("hang-0.example")
    # Its thread returns: the slot comes back (a lookup gets in while hang-1 still waits), and
    # what the abandoned lookup found in the end is kept, so asking again costs no lookup.
    assert await resolver.addresses("alice", "fast.example")
    assert "does not resolve (Temporary failure" in str(await failure_of(resolver.addresses("alice", "hang-0.example")))
    assert blocking.asked.count("hang-0.example") == 1
    resolver.close()


async def test_answers_and_failures_are_cached_per_token_for_a_short_time(blocking: Blocking) -> None:
    now = [0.0]
    resolver = HostResolver(2, 5.0, lookup=blocking, timer=lambda: now[0])
    for _ in range(2):
        await resolver.addresses("alice", "fast.example")
        with pytest.raises(TargetError, match=r"'missing\.example' does not resolve \(Name or service not known\)"):
            await resolver.addresses("alice", "missing.example")
    assert blocking.asked == ["fast.example", "missing.example"]
    await resolver.addresses("bob", "fast.example")  # another token's cache
    now[0] = NEGATIVE_TTL_S + 1
    await resolver.addresses("alice", "fast.example")
    await failure_of(resolver.addresses("alice", "missing.example"))
    assert blocking.asked == ["fast.example", "missing.example", "fast.example", "missing.example"]
    now[0] = POSITIVE_TTL_S + 1
    await resolver.addresses("alice", "fast.example")
    assert blocking.asked.count("fast.example") == 3
    resolver.close()


async def test_the_cache_is_bounded(blocking: Blocking) -> None:
    resolver = HostResolver(1, 5.0, lookup=blocking)
    for i in range(CACHE_ENTRIES + 1):
        await resolver.addresses("alice", f"name-{i}.example")
    await resolver.addresses("alice", "name-0.example")
    assert blocking.asked.count("name-0.example") == 2
    resolver.close()


# ---- a real server whose DNS server is the test's -----------------------------------------

def jailed_server(directory: Path, dns: DnsListener, dns_timeout_s: int, **overrides: object) -> LiveServer:
    """A server process whose only DNS server is `dns`, which glibc waits `dns_timeout_s` for."""
    config = write_config(directory / "config.json", nmap_path=NMAP, **overrides)
    prefix = with_resolv_conf(dns.resolv_conf(directory, dns_timeout_s))
    server = LiveServer(config, directory / "server.log", json.loads(config.read_text())["port"],
                        program=(*prefix, sys.executable, str(ROOT / "server.py")))
    server.start()
    return server


@pytest.fixture
def silent_dns() -> Iterator[DnsListener]:
    dns = DnsListener(silent=True)
    yield dns
    dns.stop()


@pytest.mark.server
@pytest.mark.requires_root(JAIL)
@pytest.mark.slow("the hung lookups last the silent DNS server's 8 s, and the server waits for them when it stops")
async def test_one_tokens_hung_lookups_leave_another_tokens_scan_alone(tmp_path: Path, silent_dns: DnsListener) -> None:
    server = jailed_server(tmp_path, silent_dns, 8, resolve_timeout=3)
    try:
        hung = [asyncio.create_task(call_tool(server.url, ALICE, "quick_scan", {"target": f"hang-{i}.nmap-mcp.test"}))
                for i in range(12)]
        assert await eventually(lambda: len(set(silent_dns.names())) >= LOOKUPS_PER_CALLER, 60)
        started = time.monotonic()
        scan = await call_tool(server.url, BOB, "quick_scan", {"target": "localhost"})
        latency = time.monotonic() - started
        refusals = [error_text(result) for result in await asyncio.gather(*hung)]
    finally:
        server.stop()
    print(f"bob's quick_scan of localhost took {latency:.2f} s while alice's 12 lookups hung")
    assert not scan.is_error, scan.content
    assert scan.structured_content is not None and scan.structured_content["status"] == "completed"
    # Alice's lookups: two reached the DNS server, the ten beyond her share none.
    assert len(set(silent_dns.names())) == LOOKUPS_PER_CALLER
    assert sum("took more than 3 s" in refusal for refusal in refusals) == LOOKUPS_PER_CALLER


REFUSED_BEFORE_ANY_LOOKUP = [
    # bob is held to 127.0.0.0/24, so his names are not looked up: no channel through DNS
    (BOB, "quick_scan", {"target": "side-channel.nmap-mcp.test"}),
    # malformed addresses and ranges are not hostnames
    (ALICE, "quick_scan", {"target": "127.43.1.1-300"}),
    (ALICE, "quick_scan", {"target": "1.2.3.4-5-6"}),
    (ALICE, "quick_scan", {"target": "10.0.0.1-10.0.0.5"}),
    (ALICE, "quick_scan", {"target": "256.1.1.1"}),
    (ALICE, "quick_scan", {"target": "1.2.3"}),
    # the built-in deny list
    (ALICE, "quick_scan", {"target": "metadata.google.internal"}),
    # a name in a call that has a refused target
    (ALICE, "custom_scan", {"command": "-p 80 in-a-refused-call.nmap-mcp.test 256.1.1.1"}),
]


@pytest.mark.server
@pytest.mark.requires_root(JAIL)
async def test_a_refused_name_costs_no_dns_query(tmp_path: Path, dns_server: DnsListener) -> None:
    tokens = {"alice": {"secret": ALICE}, "bob": {"secret": BOB, "allowed_targets": ["127.0.0.0/24"]}}
    server = jailed_server(tmp_path, dns_server, 1, tokens=tokens)
    try:
        refusals = [await call_tool(server.url, token, tool, args) for token, tool, args in REFUSED_BEFORE_ANY_LOOKUP]
        control = await call_tool(server.url, ALICE, "quick_scan", {"target": "control.nmap-mcp.test"})
    finally:
        server.stop()
    assert all(result.is_error for result in refusals)
    assert "this token may not have names resolved" in error_text(refusals[0])
    assert "'control.nmap-mcp.test' does not resolve" in error_text(control)
    asked = set(dns_server.names())
    print(f"DNS queries for refused names: {len(asked - {'control.nmap-mcp.test'})}")
    # The control name reached the DNS server: it is watching, and saw nothing else.
    assert asked == {"control.nmap-mcp.test"}
