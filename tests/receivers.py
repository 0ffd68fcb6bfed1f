"""Webhook receivers for the tests and benchmarks: real HTTP(S) servers, well-behaved or hostile.

Each receiver listens on an address of its own in 127.41.0.0/16 (the range these tests bind),
records every request, and answers by path. Names resolve through a `NameTable` the test
controls: this machine has no DNS to repoint, and the service's sender takes its resolver as
a parameter, so a test points a name at one address, then at another, exactly as a DNS
change would between two attempts.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import socket
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from targets import IPAddress
from tests.support import free_port

# Hostile answers, by path: a 200 whose body never ends, one whose body comes a byte at a
# time, and one whose headers do.
STREAM, TRICKLE, TRICKLE_HEADERS = "/hostile/stream", "/hostile/trickle", "/hostile/trickle-headers"
DRIP_SECONDS = 0.05


def receiver_address() -> str:
    """A random address of 127.41.0.0/16, so that parallel tests' receivers never meet."""
    return f"127.41.{random.randint(1, 254)}.{random.randint(1, 254)}"


class NameTable:
    """A resolver for webhooks.Sender: each name answers the addresses the test gave it last."""

    def __init__(self) -> None:
        self.names: dict[str, list[IPAddress]] = {}
        self.asked: list[str] = []

    def point(self, name: str, *addresses: str) -> None:
        self.names[name] = [ipaddress.ip_address(address) for address in addresses]

    async def resolve(self, host: str, _port: int) -> list[IPAddress]:
        self.asked.append(host)
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.names[host]


class WebhookReceiver:
    """An HTTP server (HTTPS with `tls`) that records (path, headers, body) of every request.
    A path of `statuses` answers those statuses in turn, the last repeating (a 3xx points at
    /elsewhere); the hostile paths misbehave; any other path answers 200. `streamed` counts the
    bytes STREAM got out before the client hung up; `server_names` the SNI of each handshake."""

    def __init__(self, host: str | None = None, *, statuses: dict[str, list[int]] | None = None,
                 tls: ssl.SSLContext | None = None, stream_bytes: int = 1 << 30, trickle_s: float = 30.0) -> None:
        self.host = host or receiver_address()
        self.port = free_port(self.host)
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.server_names: list[str | None] = []
        self.streamed = 0
        self.stream_bytes, self.trickle_s = stream_bytes, trickle_s
        self.scheme = "https" if tls else "http"
        self._statuses = statuses or {}
        self._stopped = threading.Event()
        self._server = ThreadingHTTPServer((self.host, self.port), self._handler())
        if tls is not None:
            tls.sni_callback = lambda _socket, name, _context: self.server_names.append(name)
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        """This receiver's URL for `path`, by its address or by the name `host`."""
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def posts(self, path: str) -> list[tuple[dict[str, str], bytes]]:
        return [(headers, body) for at, headers, body in self.requests if at == path]

    def stop(self) -> None:
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append((self.path, dict(self.headers), body))
                receiver._answer(self)

            def log_message(self, *_args: object) -> None:
                pass

        return Handler

    def _answer(self, handler: BaseHTTPRequestHandler) -> None:
        if handler.path == STREAM:
            self._stream(handler)
        elif handler.path in (TRICKLE, TRICKLE_HEADERS):
            self._trickle(handler, headers_too=handler.path == TRICKLE_HEADERS)
        else:
            statuses = self._statuses.get(handler.path, [200])
            status = statuses.pop(0) if len(statuses) > 1 else statuses[0]
            handler.send_response(status)
            if 300 <= status < 400:
                handler.send_header("Location", self.url("/elsewhere"))
            handler.send_header("Content-Length", "0")
            handler.end_headers()

    def _stream(self, handler: BaseHTTPRequestHandler) -> None:
        """200, then a body without a length, sent as fast as the client takes it."""
        handler.send_response(200)
        handler.end_headers()
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            while self.streamed < self.stream_bytes and not self._stopped.is_set():
                handler.wfile.write(chunk)
                self.streamed += len(chunk)

    def _trickle(self, handler: BaseHTTPRequestHandler, *, headers_too: bool) -> None:
        """A byte of the headers (or of the body after them) every DRIP_SECONDS, for trickle_s."""
        handler.wfile.write(b"HTTP/1.1 200 OK\r\nX-Slow: " if headers_too else b"HTTP/1.1 200 OK\r\n\r\n")
        ends = time.monotonic() + self.trickle_s
        with contextlib.suppress(OSError):
            while time.monotonic() < ends and not self._stopped.wait(DRIP_SECONDS):
                handler.wfile.write(b"a")


def tls_certificate(directory: Path, hostname: str) -> tuple[Path, Path]:
    """A self-signed certificate valid for `hostname` only (its own trust anchor), and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(hours=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / f"{hostname}.pem", directory / f"{hostname}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def tls_contexts(directory: Path, hostname: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for `hostname`, and a client context trusting it alone."""
    cert_path, key_path = tls_certificate(directory, hostname)
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert_path, key_path)
    return server, ssl.create_default_context(cafile=str(cert_path))
