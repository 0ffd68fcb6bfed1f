"""A host behind a firewall, for the tests that need one: a network namespace of the test's own
whose loopback address has a listener, an nmap wrapper that scans from inside it, and an
nftables table there that drops what the test says. Scans stay on that namespace's loopback.
Needs root (ip netns, nsenter, nft)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REAL_NMAP
from tests.support import free_port

ADDRESS = "127.0.0.9"
LISTEN = "import socket, sys\ns = socket.create_server((sys.argv[1], int(sys.argv[2])))\nprint('ready', flush=True)\n" \
         "while True:\n    s.accept()[0].close()\n"


@dataclass
class FirewalledHost:
    """`address`:`port` listening in `namespace`, and `nmap`, which scans from inside it."""

    namespace: str
    address: str
    port: int
    nmap: Path

    def drop(self, ports: str | None = None) -> None:
        """Drop TCP to the host: to `ports` only (nftables set syntax, '80, 443'), or all of it."""
        match = ["tcp", "dport", f"{{ {ports} }}"] if ports else ["ip", "protocol", "tcp"]
        self._nft("add", "rule", "inet", "fence", "input", "ip", "daddr", self.address, *match, "drop")

    def _nft(self, *words: str) -> None:
        subprocess.run([*inside(self.namespace), "nft", *words], check=True)


def inside(namespace: str) -> list[str]:
    """The prefix that runs a command in network namespace `namespace` and nothing else: `ip
    netns exec` also makes a mount namespace, which needs `/` to be a mount point (it is not in
    a chroot, as in a debootstrapped root)."""
    return ["nsenter", f"--net=/run/netns/{namespace}"]


@contextlib.contextmanager
def firewalled_host(directory: Path) -> Iterator[FirewalledHost]:
    """A FirewalledHost that drops nothing yet; removed with everything in it at the end."""
    name = f"nmcp-fw-{uuid.uuid4().hex[:8]}"
    nmap = directory / "nmap-in-namespace"
    nmap.write_text(f'#!/bin/sh\nexec {" ".join(inside(name))} {REAL_NMAP} "$@"\n')
    nmap.chmod(0o755)
    listener = None
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run([*inside(name), "ip", "link", "set", "lo", "up"], check=True)
        host = FirewalledHost(name, ADDRESS, free_port(), nmap)
        host._nft("add", "table", "inet", "fence")
        host._nft("add", "chain", "inet", "fence", "input", "{ type filter hook input priority 0; }")
        listener = subprocess.Popen([*inside(name), sys.executable, "-c", LISTEN, ADDRESS, str(host.port)],
                                    stdout=subprocess.PIPE, text=True)
        assert listener.stdout is not None and listener.stdout.readline() == "ready\n"
        yield host
    finally:
        if listener is not None:
            listener.kill()
            listener.wait()
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
