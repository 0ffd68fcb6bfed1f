"""Scan targets for the scale benchmark: loopback ranges inside a network namespace of its own.

A namespace `sc-XXXXXXXX` has its own loopback (127.0.0.0/8 is local there, every address up),
invisible from the host and from other namespaces; a listener process inside it opens a few
ports on one address in STRIDE (5%), and an nmap wrapper runs nmap inside it, so the service
on the host scans only the namespace's loopback. Optionally every TCP packet there is held
`delay_ms` (bench/packet_delay.py through iptables' NFQUEUE): a slow network, as
`tc qdisc ... netem delay` would make one where the kernel has netem. Needs root.

    python bench/namespace_targets.py listen NETWORK   # the listener, run inside the namespace
"""

from __future__ import annotations

import contextlib
import ipaddress
import resource
import selectors
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.namespaces import inside
from tests.support import START_UP_SECONDS, ServiceProcess, wait_until

# The ports every scan of the benchmark asks for; a listening address has 3, 4 or 5 of them open.
PORTS = (22, 80, 443, 8080, 8443)
STRIDE = 20
QUEUE = 0
HERE = Path(__file__).resolve().parent


def listening(network: ipaddress.IPv4Network) -> dict[str, tuple[int, ...]]:
    """The open ports of each listening address of `network`. A function of the address's
    index, so a network that starts where a bigger one does has the bigger one's listeners."""
    return {str(network[i]): PORTS[:3 + i // STRIDE % 3] for i in range(7, network.num_addresses, STRIDE)}


def open_port_count(network: ipaddress.IPv4Network) -> int:
    return sum(map(len, listening(network).values()))


@dataclass
class Namespace:
    """A namespace with listeners, and `nmap`: a wrapper that runs nmap inside it."""

    name: str
    nmap: Path


@contextlib.contextmanager
def namespace(directory: Path, network: ipaddress.IPv4Network, delay_ms: float = 0) -> Iterator[Namespace]:
    """A fresh namespace whose `network` has the listeners of `listening`, and its packets held
    `delay_ms` when given; everything in it stopped and the namespace deleted at the end."""
    name = f"sc-{uuid.uuid4().hex[:8]}"
    nmap = directory / f"nmap-{name}"
    nmap.write_text(f'#!/bin/sh\nexec {" ".join(inside(name))} {shutil.which("nmap")} "$@"\n')
    nmap.chmod(0o755)
    processes: list[ServiceProcess] = []
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run([*inside(name), "ip", "link", "set", "lo", "up"], check=True)
        processes.append(_ready(directory / f"{name}-listen.log",
                                [*inside(name), sys.executable, __file__, "listen", str(network)]))
        if delay_ms:
            processes.append(_ready(directory / f"{name}-delay.log", [
                *inside(name), sys.executable, str(HERE / "packet_delay.py"), "--queue", str(QUEUE),
                "--delay-ms", str(delay_ms)]))
            subprocess.run([*inside(name), "iptables-legacy", "-A", "OUTPUT", "-o", "lo", "-p", "tcp", "-j", "NFQUEUE",
                            "--queue-num", str(QUEUE), "--queue-bypass"], check=True)
        yield Namespace(name, nmap)
    finally:
        for process in processes:
            process.stop()
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _ready(log: Path, argv: list[str]) -> ServiceProcess:
    """A process of the namespace, once it printed 'ready'."""
    process = ServiceProcess(argv, log).start()
    try:
        if not wait_until(lambda: _said_ready(process), START_UP_SECONDS, 0.05):
            raise RuntimeError(f"{argv} did not say ready:\n{process.log_text()}")
    except BaseException:
        process.stop()
        raise
    return process


def _said_ready(process: ServiceProcess) -> bool:
    process.check_running()
    return "ready" in process.log_text()


def listen(network: ipaddress.IPv4Network) -> None:
    """Open `listening(network)` and accept and close every connection, like a quiet service
    (a backlog nobody accepts would fill up, and its port look filtered)."""
    sockets = [(address, port) for address, ports in listening(network).items() for port in ports]
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    selector = selectors.DefaultSelector()
    for address, port in sockets:
        sock = socket.create_server((address, port), backlog=256)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            with contextlib.suppress(OSError):
                key.fileobj.accept()[0].close()  # type: ignore[union-attr]


if __name__ == "__main__":
    listen(ipaddress.ip_network(sys.argv[2]))
