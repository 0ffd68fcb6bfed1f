"""Helpers shared by the tests: listeners, the nmap wrapper, live servers, MCP calls."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastmcp
import httpx
import httpx2
import psycopg
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.types import CallToolResult
from sqlalchemy import insert
from sqlalchemy.engine import URL, make_url

from db import Database
from findings import HostSpool, ReportSpool, ScanOutcome
from inventory_store import fold_next, next_fold_order
from models import ResultPage, ScanResult, TaskRecord, TaskStatus, tasks
from result_store import encoded, write_found
from sandbox import confinement

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SECRETS = {"alice": "alice-secret-" + "a" * 24, "bob": "bob-secret-" + "b" * 26}
ALICE, BOB = SECRETS["alice"], SECRETS["bob"]
# The admin URL of the test PostgreSQL server: TCP or, as ./test.sh sets it, its unix socket
# (postgresql://postgres@/postgres?host=/socket/dir&port=NNNN).
POSTGRES_ADMIN_URL = os.environ.get("NMAP_MCP_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
# How long a process of the service may take to start. Importing its packages takes about 2 s
# on an idle 2-core machine, but servers did not start within 20 s at a load average of 9 there
# (other work, and both test workers starting servers at once). A bound on waits for a
# condition: only a process that never starts costs this long.
START_UP_SECONDS = 120


INITIALIZE = {
    "jsonrpc": "2.0", "id": 1, "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}},
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def post(server: LiveServer, *, url: str | None = None, body: object = INITIALIZE, **headers: str) -> httpx.Response:
    """One raw JSON-RPC POST (an initialize unless `body` says otherwise) to the server."""
    return httpx.post(url or server.url, json=body, headers=MCP_HEADERS | headers, timeout=10)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port below 32768 (outside the ephemeral range) that nothing listens on."""
    for _ in range(200):
        port = random.randint(10_000, 32_000)
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below 32768")


def postgres_socket_url(database: str) -> str:
    """A URL for `database` on the test PostgreSQL server over its unix socket, which processes
    inside a network namespace can reach (a TCP admin URL means the machine's server, whose
    socket is in /var/run/postgresql)."""
    url = make_url(POSTGRES_ADMIN_URL)
    socket_dir = url.query.get("host", "/var/run/postgresql")
    port = url.query.get("port", str(url.port or 5432))
    query = {"host": socket_dir, "port": port}
    socket_url = URL.create(url.drivername, url.username, url.password, database=database, query=query)
    return socket_url.render_as_string(hide_password=False)


@contextlib.contextmanager
def scratch_database() -> Iterator[str]:
    """A new database on the test PostgreSQL server, dropped (with its connections) at the end; yields its name."""
    name = f"nmap_mcp_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_bindir() -> Path:
    """Where initdb and pg_ctl are: the newest /usr/lib/postgresql/N/bin on Debian, else PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name.split(".")[0]))
    return versions[-1] if versions else Path(shutil.which("initdb") or "initdb").parent


def as_postgres(argv: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL program as user postgres when we are root (the server refuses root),
    else as ourselves, as scripts/with-postgres.sh does."""
    runuser = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*runuser, *argv], cwd=cwd, capture_output=True, text=True, check=check)


def postgres_owns(directory: Path) -> None:
    """Hand directory to user postgres when we are root, so that as_postgres may write there."""
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres", "postgres")


# nmap runs as the tests' own user, also as root: the recording wrapper (NmapWrapper) writes a
# file per start, which nmap confined as another user may not (tests/test_sandbox.py tests that).
OWN_USER = {"nmap_user": "root"}


def own_user_sandbox() -> tuple[str, ...]:
    """The sandbox a server with OWN_USER runs nmap in, for tests that build a worker or run nmap."""
    return confinement("root", privileged=False, nmap_path="nmap").prefix


def unprivileged(argv: Sequence[str]) -> list[str]:
    """argv run by a user who is not root. As root: user nobody, with no capability but reading
    any file (CAP_DAC_READ_SEARCH), so that it can run this checkout's .venv even where nobody
    may not go (a checkout under /root, mode 0700); as anyone else: ourselves."""
    if os.geteuid() != 0:
        return list(argv)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    return [*nobody, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", *argv]


class PrivatePostgres:
    """A PostgreSQL server of the test's own, never the machine's: run by user postgres (or by
    us when we are not root), its data and its unix socket (its only way in) in `directory`,
    stopped and started at will."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self._data = directory / "data"
        self._pg_ctl = str(postgres_bindir() / "pg_ctl")
        postgres_owns(directory)
        initdb = [str(postgres_bindir() / "initdb"), "-D", str(self._data), "-U", "postgres", "--auth=trust",
                  "--no-sync", "--no-locale", "-E", "UTF8"]
        as_postgres(initdb, directory)
        with (self._data / "postgresql.conf").open("a") as conf:
            conf.write(f"listen_addresses = ''\nport = {self.port}\nunix_socket_directories = '{directory}'\n"
                       "fsync = off\n")

    def url(self, database: str = "postgres") -> str:
        """A URL for `database` over the socket, as a service config takes it."""
        return f"postgresql://postgres@/{database}?host={self.directory}&port={self.port}"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        as_postgres([self._pg_ctl, "-D", str(self._data), "-l", str(self.directory / "log"), "-w", "start"],
                    self.directory)

    def stop(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m MODE`: fast ends every session at once, immediate does not even checkpoint."""
        as_postgres([self._pg_ctl, "-D", str(self._data), "-m", mode, "-w", "stop"], self.directory)

    def running(self) -> bool:
        status = [self._pg_ctl, "-D", str(self._data), "status"]
        return as_postgres(status, self.directory, check=False).returncode == 0

    def freeze(self) -> list[int]:
        """SIGSTOP the server and every process it started, as a paused VM or storage would
        stop it: connections stay open, nothing answers. The pids, for `thaw`."""
        postmaster = int((self._data / "postmaster.pid").read_text().split()[0])
        pids = [postmaster, *children_of(postmaster)]
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def thaw(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


@contextlib.contextmanager
def tmpfs(size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's size=, e.g. 2m) on a new directory; needs root. It is unmounted
    at the end even on failure: lazily, so that a server still holding files there cannot keep
    it mounted."""
    mount = Path(tempfile.mkdtemp(prefix="nmap-mcp-disk-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)
        mount.rmdir()


def fill(directory: Path) -> Path:
    """Fill the filesystem holding `directory` with a file until not one more block fits; the
    file is returned (unlink it to free the space)."""
    filler = directory / "filler"
    chunk = bytes(64 * 1024)
    with filler.open("ab", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
    return filler


def top_ports(count: int = 100) -> list[int]:
    """nmap's `--top-ports` list for TCP, read from its services file."""
    services = Path("/usr/share/nmap/nmap-services").read_text().splitlines()
    ranked = []
    for line in services:
        fields = line.split()
        if len(fields) >= 3 and not line.startswith("#") and fields[1].endswith("/tcp"):
            ranked.append((float(fields[2]), int(fields[1].split("/")[0])))
    return [port for _, port in sorted(ranked, reverse=True)[:count]]


def with_lan_elements(xml: bytes) -> bytes:
    """A recorded report with a MAC address (and its vendor) and a PTR name added to its hosts.

    Loopback has no link layer and scans run with -n, so no real run here can produce either:
    the two elements are edited in, in the exact form nmap writes them on a LAN.
    """
    return xml.replace(
        b'<address addr="127.0.0.1" addrtype="ipv4"/>',
        b'<address addr="127.0.0.1" addrtype="ipv4"/>\n<address addr="52:54:00:12:34:56" addrtype="mac" '
        b'vendor="QEMU virtual NIC"/>',
    ).replace(b"<hostnames>\n</hostnames>", b'<hostnames>\n<hostname name="gw.example.lan" type="PTR"/>\n</hostnames>')


class Listeners:
    """TCP listeners the test opened, accepting and closing every connection like a quiet
    service (an unaccepted backlog would fill up and make the port look filtered)."""

    def __init__(self) -> None:
        self.sockets: dict[int, socket.socket] = {}
        self._selector = selectors.DefaultSelector()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept_forever, daemon=True)
        self._thread.start()

    def open(self, port: int, host: str = "127.0.0.1") -> bool:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            sock.close()
            return False
        sock.listen(64)
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ)
        self.sockets[port] = sock
        return True

    def open_free_top_ports(self, count: int, host: str = "127.0.0.1") -> list[int]:
        """Listen on `count` ports from nmap's top 100 that are free on `host`, 1024-32767."""
        opened = []
        for port in top_ports(100):
            if 1024 <= port < 32768 and self.open(port, host):
                opened.append(port)
            if len(opened) == count:
                return opened
        raise RuntimeError("not enough free ports among nmap's top 100")

    def _accept_forever(self) -> None:
        while not self._stopped.is_set():
            for key, _ in self._selector.select(timeout=0.05) if self._selector.get_map() else ():
                with contextlib.suppress(OSError):
                    connection, _ = key.fileobj.accept()  # type: ignore[union-attr]
                    connection.close()
            if not self._selector.get_map():
                time.sleep(0.05)

    def close(self, port: int) -> None:
        sock = self.sockets.pop(port)
        self._selector.unregister(sock)
        sock.close()

    def close_all(self) -> None:
        for port in list(self.sockets):
            self.close(port)

    def stop(self) -> None:
        self.close_all()
        self._stopped.set()
        self._thread.join(5)


@dataclass
class NmapWrapper:
    """An nmap stand-in that records each start of a scan, optionally waits, then execs real
    nmap (`nmap --version`, which every worker runs once as it starts, at once and unrecorded).

    nmap runs with a zero file-size limit, so each start is recorded as an empty file
    named after its pid: creating a file needs no bytes.
    """

    path: Path
    starts: Path
    delay_file: Path

    def set_delay(self, seconds: float) -> None:
        # Replaced, not rewritten: a wrapper starting meanwhile must never read an emptied file
        # (float('') fails it, and its scan with it: seen once in test_fleet's outage test).
        staged = self.delay_file.with_suffix(".new")
        staged.write_text(str(seconds))
        os.replace(staged, self.delay_file)

    def pids(self) -> list[int]:
        return sorted(int(p.name) for p in self.starts.iterdir())

    def alive(self) -> list[int]:
        return [pid for pid in self.pids() if process_alive(pid)]


def process_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):  # gone, or going while it was read
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


async def eventually(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """`wait_until` for async tests: the event loop (and calls under way on it) keeps running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(interval)
    return condition()


@dataclass
class LiveServer:
    """The server (`python server.py -c CONFIG` unless `program` says otherwise) as a real process on a free port."""

    config_path: Path
    log_path: Path
    port: int
    process: subprocess.Popen[bytes] | None = None
    extra: dict[str, object] = field(default_factory=dict)
    # What runs with `-c CONFIG`: the checkout's server.py, or an installed `nmap-mcp`.
    program: tuple[str, ...] = (sys.executable, str(ROOT / "server.py"))
    # Where stdout (the banner) goes; None: into the log with stderr.
    stdout_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def start(self) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [*self.program, "-c", str(self.config_path)],
            stdout=self.stdout_path.open("ab") if self.stdout_path else log,
            stderr=log,
            cwd=self.config_path.parent,
        )
        if not wait_until(self._healthy, START_UP_SECONDS, 0.05):
            self.stop()
            raise RuntimeError("server did not start:\n" + self.log_path.read_text())

    def _healthy(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError("server exited:\n" + self.log_path.read_text())
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"http://127.0.0.1:{self.port}/healthz", timeout=1).status_code == 200
        return False

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


StartServer = Callable[..., "LiveServer"]


def server_argv(config: Path, *options: str, prefix: Sequence[str] = ()) -> list[str]:
    """`python server.py -c CONFIG OPTIONS`, run under `prefix` (`nsenter --net=...`, `unshare ...`)."""
    return [*prefix, sys.executable, str(ROOT / "server.py"), "-c", str(config), *options]


@dataclass
class ServiceProcess:
    """A process in a session of its own, stopped by its process group: a signal reaches it
    and whatever wraps it (`nsenter` execs it, `unshare --fork` waits for it)."""

    argv: list[str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    # The environment it starts with; None: ours.
    env: dict[str, str] | None = None

    def start(self) -> ServiceProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                            start_new_session=True, env=self.env)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_running(self) -> None:
        """Raise with its log when it has exited."""
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.argv} exited with {self.process.returncode}:\n{self.log_text()}")

    def kill(self) -> None:
        """SIGKILL to the whole group, as a crash would."""
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the group; SIGKILL when it has not exited within `timeout` s."""
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def stdio_initialize(argv: Sequence[str], cwd: Path) -> dict[str, Any]:
    """Start argv as a desktop app starts a local MCP server (from its own directory, with the
    system's PATH and not ours), send initialize, and return the answer's result; the end of
    stdin then ends the server."""
    env = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    ran = subprocess.run(argv, input=json.dumps(INITIALIZE) + "\n", env=env, cwd=cwd, capture_output=True,
                         text=True, timeout=START_UP_SECONDS, check=False)
    assert ran.returncode == 0, (argv, ran.stderr)
    return json.loads(ran.stdout.splitlines()[0])["result"]


def write_config(path: Path, **overrides: object) -> Path:
    document: dict[str, object] = {
        "host": "127.0.0.1",
        "port": free_port(),
        "tokens": {name: {"secret": secret} for name, secret in SECRETS.items()},
        "allow_loopback": True,
        "db_path": str(path.parent / "tasks.db"),
        "log_level": "DEBUG",
        **OWN_USER,
    }
    document.update(overrides)
    path.write_text(json.dumps(document))
    return path


async def call_tool(
    url: str, token: str, name: str, args: dict[str, Any], *, mode: str = "auto", via: str = "header"
) -> CallToolResult:
    """One tools/call through the official MCP Python SDK, authenticated either way."""
    headers = {"Authorization": f"Bearer {token}"} if via == "header" else {}
    target_url = url if via == "header" else f"{url}?token={token}"
    async with (
        httpx2.AsyncClient(headers=headers, timeout=120) as http,
        Client(streamable_http_client(target_url, http_client=http), mode=mode) as client,  # type: ignore[arg-type]
    ):
        return await client.call_tool(name, args)


async def raw_tool_call(url: str, token: str, name: str, args: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """One tools/call as a single HTTP POST, without the follow-up requests an SDK client
    may make (tools/list for output validation); returns the JSON-RPC result."""
    result, _ = await tool_call_on_the_wire(url, token, name, args, timeout)
    return result


async def tool_call_on_the_wire(
    url: str, token: str, name: str, args: dict[str, Any], timeout: float = 120
) -> tuple[dict[str, Any], int]:
    """raw_tool_call, and the bytes of the HTTP response body that carried the answer."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": args}}
    headers = MCP_HEADERS | {"Authorization": f"Bearer {token}", "MCP-Protocol-Version": "2025-11-25"}
    async with httpx.AsyncClient(timeout=timeout) as http:
        response = await http.post(url, json=body, headers=headers)
    data = [line[5:] for line in response.text.splitlines() if line.startswith("data:")]
    message = json.loads(data[-1] if data else response.text)
    return message["result"], len(response.content)


async def call(client: fastmcp.Client, name: str, arguments: dict[str, Any]) -> CallToolResult:
    """One tools/call through an in-memory client (the in_memory fixture); a tool error comes
    back as a result with is_error, as call_tool returns it over HTTP."""
    return await client.call_tool(name, arguments, raise_on_error=False)  # type: ignore[return-value]


async def answer_of(client: fastmcp.Client, name: str, /, **arguments: Any) -> dict[str, Any]:
    """The structured answer of a tool call that must succeed, through an in-memory client
    (positional-only: a tool may take an argument called `name`)."""
    result = await call(client, name, arguments)
    assert not result.is_error, error_text(result)
    assert result.structured_content is not None
    return result.structured_content


async def finished(client: fastmcp.Client, task_id: str, timeout: float = 30) -> dict[str, Any]:
    """get_task_result of a task once it has left queued and running, through an in-memory client."""
    deadline = time.monotonic() + timeout
    while (found := await answer_of(client, "get_task_result", task_id=task_id))["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, f"still {found['status']} after {timeout} s"
        await asyncio.sleep(0.1)
    return found


async def running_task(client: fastmcp.Client, nmap: NmapWrapper) -> str:
    """The id of the one task running, once its nmap has started (the call that submitted it
    may still be waiting): a task under way without waiting out a call's timeout."""
    assert await eventually(lambda: len(nmap.alive()) == 1, 20), "nmap did not start"
    [task] = (await answer_of(client, "list_tasks", status="running"))["tasks"]
    return str(task["task_id"])


def error_text(result: CallToolResult) -> str:
    assert result.is_error, f"expected an error, got {result.structured_content}"
    return result.content[0].text  # type: ignore[union-attr]


async def failure_of(call: Awaitable[object]) -> BaseException:
    """Await a call that must fail; return the innermost error (anyio wraps them in groups)."""
    try:
        await call
    except BaseException as e:  # noqa: BLE001 - the point is to inspect whatever it raised
        while isinstance(e, BaseExceptionGroup) and e.exceptions:
            e = e.exceptions[0]
        return e
    raise AssertionError("the call succeeded; a failure was expected")


class SilentServer:
    """A loopback TCP service that accepts and then says nothing, for as long as the client
    stays: nmap's version detection waits on it through all its probes."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = free_port(host)
        self._sock = socket.create_server((host, self.port), backlog=64)
        self._sock.settimeout(0.2)
        self._held: list[socket.socket] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                self._held.append(self._sock.accept()[0])

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        for held in self._held:
            held.close()
        self._sock.close()


class BannerServer:
    """A loopback TCP service that greets every client with an SSH banner, so that nmap's
    version detection and the banner script finish at once instead of waiting ~6 s."""

    BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n"

    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.port = port or free_port(host)
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind((host, self.port))
        self._sock.listen(32)
        self._sock.settimeout(0.2)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with contextlib.suppress(OSError), conn:
                conn.sendall(self.BANNER)
                conn.settimeout(0.5)
                with contextlib.suppress(OSError):
                    conn.recv(1024)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)
        self._sock.close()


async def poll_until_finished(url: str, token: str, task_id: str, timeout: float = 30) -> dict[str, Any]:
    """Call get_task_result until the task leaves queued/running; return its answer."""
    deadline = time.monotonic() + timeout
    while True:
        answer = (await call_tool(url, token, "get_task_result", {"task_id": task_id})).structured_content
        if answer["status"] not in ("queued", "running") or time.monotonic() > deadline:
            return answer
        await asyncio.sleep(0.2)


def paged(result: ScanResult, offset: int, limit: int) -> dict[str, Any]:
    """What the store gives a view of `result` to show (result_store.page_of): its head, its
    hosts [offset, offset + limit), where they start, and how many it has in all."""
    window = result.hosts[offset: offset + limit]
    return {"page": ResultPage(result.model_copy(update={"hosts": []}), window, offset, len(window),
                               len(result.hosts))}


def outcome_of(result: ScanResult, raw: bytes = b"", status: TaskStatus = TaskStatus.COMPLETED) -> ScanOutcome:
    """A verdict holding `result` whole, its hosts compressed as a worker's are, and `raw` as its XML."""
    report = ReportSpool()
    report.add(raw)
    return ScanOutcome(status, result.model_copy(update={"hosts": []}), None, HostSpool.of(result.hosts), report)


def store_completed(db: Database, record: TaskRecord, result: ScanResult) -> None:
    """`record` completed with `result`, stored as a verdict stores them (worker_store._finish):
    its result in chunks, its fold into the owner's inventory pending, finished now."""
    found = encoded(record.id, outcome_of(result))
    with db.writing() as conn:
        conn.execute(insert(tasks).values(
            id=record.id, owner=record.owner, kind=record.kind.value, target=record.target,
            argv=json.dumps(record.argv), status=TaskStatus.COMPLETED.value, created_at=record.created_at,
            finished_at=time.time(), time_limit=record.time_limit, fold_order=next_fold_order(conn, record.owner),
            **found.columns))
        write_found(conn, found)


def fold_pending(db: Database, owner: str) -> int:
    """Fold the owner's pending folds, a batch per transaction as the worker does; the batches."""
    batches = 0
    while True:
        with db.writing() as conn:
            if fold_next(conn, owner, 30.0) is None:
                return batches
        batches += 1
