"""A resolver the test owns, and processes that use it: DNS made observable.

`DnsListener` is a real DNS server on UDP port 53 of an address in 127.42.0.0/16 that
records the name of every query. `with_resolv_conf` runs a command (nmap, the server) in a
mount namespace of its own whose /etc/resolv.conf names only that listener, so glibc's
resolver, and nmap's NSE `dns` library, ask it and nothing else; the machine's own
/etc/resolv.conf is untouched. Both need root (port 53, mount namespaces).
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import sys
import threading
from pathlib import Path

# Run by `with_resolv_conf` inside the new mount namespace: bind the test's file over
# /etc/resolv.conf (unshare made the mounts private, so the host never sees it), then exec.
_BIND_AND_EXEC = (
    "import os, subprocess, sys\n"
    "subprocess.run(['mount', '--bind', sys.argv[1], '/etc/resolv.conf'], check=True)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)
# Flags of an answer: a response, recursion desired and available, NXDOMAIN.
_NXDOMAIN_FLAGS = b"\x81\x83"


class DnsListener:
    """A DNS server that records each query's name and answers NXDOMAIN at once, or, when
    `silent`, never answers (a resolver that hangs)."""

    def __init__(self, *, silent: bool = False) -> None:
        self.silent = silent
        self.queries: list[str] = []
        self._lock = threading.Lock()
        self._socket = _bind_port_53()
        self.address = self._socket.getsockname()[0]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def names(self) -> list[str]:
        """The names asked so far, in order (a name asked for A and AAAA appears twice)."""
        with self._lock:
            return list(self.queries)

    def resolv_conf(self, directory: Path, timeout_s: int = 1) -> Path:
        """A resolv.conf naming only this server; glibc waits `timeout_s` for an answer, once."""
        path = directory / f"resolv-{self.address}.conf"
        path.write_text(f"nameserver {self.address}\noptions timeout:{timeout_s} attempts:1\n")
        return path

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self._socket.recvfrom(4096)
            except OSError:
                return
            if not query:  # stop() shut the socket down
                return
            name, question_end = _question(query)
            with self._lock:
                self.queries.append(name)
            if not self.silent:
                reply = query[:2] + _NXDOMAIN_FLAGS + query[4:6] + bytes(6) + query[12:question_end]
                with contextlib.suppress(OSError):
                    self._socket.sendto(reply, peer)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        self._thread.join(5)


def with_resolv_conf(resolv_conf: Path) -> tuple[str, ...]:
    """The prefix that runs a command with `resolv_conf` as its /etc/resolv.conf."""
    return ("unshare", "--mount", "--", sys.executable, "-c", _BIND_AND_EXEC, str(resolv_conf))


def _bind_port_53() -> socket.socket:
    """A UDP socket on port 53 of a random 127.42.x.y that no other test holds."""
    for _ in range(100):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        address = f"127.42.{random.randint(1, 254)}.{random.randint(1, 254)}"
        try:
            sock.bind((address, 53))
        except OSError as e:
            sock.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return sock
    raise RuntimeError("no free address for a DNS listener in 127.42.0.0/16")


def _question(query: bytes) -> tuple[str, int]:
    """The name a query asks for, and where its question (name, type, class) ends."""
    labels, at = [], 12
    while at < len(query) and query[at]:
        length = query[at]
        labels.append(query[at + 1:at + 1 + length].decode("ascii", "replace"))
        at += 1 + length
    return ".".join(labels), at + 5
