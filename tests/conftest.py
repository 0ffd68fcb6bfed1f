"""Shared fixtures: loopback listeners, a recording nmap wrapper, databases, a live server.

Every scan in this suite targets 127.0.0.0/8 and asserts only on ports the test opened.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastmcp import Client
from selenium import webdriver
from sqlalchemy.engine import make_url

from config import load_settings
from server import Role, create_server
from tests.browser import chromium
from tests.dns_jail import DnsListener
from tests.nodes import MakeNode, Node, start_node
from tests.support import POSTGRES_ADMIN_URL, Listeners, LiveServer, NmapWrapper, scratch_database, write_config

REAL_NMAP = shutil.which("nmap") or "/usr/bin/nmap"


# The tier a fixture puts each test that uses it in (pytest.ini says what each marker means).
# Tests that start processes, or use PostgreSQL, without these fixtures are marked in their module.
TIER_OF_FIXTURE = {"live_server": "server", "postgres_url": "postgres", "browser": "browser"}


@pytest.hookimpl(tryfirst=True)  # before -m selects by these markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with the tiers its fixtures put it in; then skip, saying why, a test
    marked requires_root("what for") unless run as root, and a test marked postgres when no
    PostgreSQL answers and NMAP_MCP_TEST_POSTGRES does not name one (see postgres_missing)."""
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        for fixture, tier in TIER_OF_FIXTURE.items():
            if fixture in fixtures:
                item.add_marker(tier)
        callspec = getattr(item, "callspec", None)
        if callspec is not None and callspec.params.get("database_url") == "postgresql":
            item.add_marker("postgres")
    if os.geteuid() != 0:
        for item in items:
            if (needs := item.get_closest_marker("requires_root")) is not None:
                item.add_marker(pytest.mark.skip(reason=f"needs root: {needs.args[0]}"))
    postgres = [item for item in items if item.get_closest_marker("postgres") is not None]
    if postgres and (missing := postgres_missing()) is not None:
        for item in postgres:
            item.add_marker(pytest.mark.skip(reason=missing))


def postgres_missing() -> str | None:
    """Why the PostgreSQL tests cannot run here, or None when they can. Set by ./test.sh (and
    so in CI), NMAP_MCP_TEST_POSTGRES must work: a server it names that does not answer fails
    those tests rather than skipping them. Unset, the tests use a server at the default URL
    when one lets them in, and are skipped when none does."""
    if "NMAP_MCP_TEST_POSTGRES" in os.environ:
        return None
    try:
        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except psycopg.Error as e:
        # psycopg says 'connection failed: connection to server at ... failed: WHY' and then hints.
        why = (str(e).splitlines() or [type(e).__name__])[0].rsplit("failed: ", 1)[-1].strip()
        return (f"no PostgreSQL lets user postgres in at {POSTGRES_ADMIN_URL} ({why}): ./test.sh starts one, "
                "or set NMAP_MCP_TEST_POSTGRES")
    return None


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    opened = Listeners()
    yield opened
    opened.stop()


@pytest.fixture
def dns_server() -> Iterator[DnsListener]:
    """A DNS server the test owns, answering NXDOMAIN and recording every name asked (needs root)."""
    server = DnsListener()
    yield server
    server.stop()


@pytest.fixture
def nmap_wrapper(tmp_path: Path) -> NmapWrapper:
    starts = tmp_path / "nmap-starts"
    starts.mkdir()
    delay_file = tmp_path / "nmap-delay"
    delay_file.write_text("0")
    path = tmp_path / "nmap"
    path.write_text(
        f"#!{sys.executable}\n"
        "import os, sys, time\n"
        "if sys.argv[1:] != ['--version']:\n"
        f"    open(os.path.join({str(starts)!r}, str(os.getpid())), 'x').close()\n"
        f"    time.sleep(float(open({str(delay_file)!r}).read()))\n"
        f"os.execv({REAL_NMAP!r}, [{REAL_NMAP!r}, *sys.argv[1:]])\n"
    )
    path.chmod(0o755)
    return NmapWrapper(path, starts, delay_file)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped at the end."""
    with scratch_database() as name:
        yield make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each task-manager test runs on a SQLite file and on the PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    url = request.getfixturevalue("postgres_url")
    from sqlalchemy import create_engine, text

    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return url


@pytest.fixture
def live_server(tmp_path: Path, nmap_wrapper: NmapWrapper) -> Iterator[Callable[..., LiveServer]]:
    """Start a server with config overrides; every server started is stopped at teardown."""
    started: list[LiveServer] = []

    def start(**overrides: object) -> LiveServer:
        overrides.setdefault("nmap_path", str(nmap_wrapper.path))
        config = write_config(tmp_path / "config.json", **overrides)
        # JSON logs: the banner (stdout) goes to a file of its own, so that the log is JSON lines only.
        banner = tmp_path / "server.out" if overrides.get("log_format") == "json" else None
        server = LiveServer(config, tmp_path / "server.log", json.loads(config.read_text())["port"], stdout_path=banner)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


class ToolClient(Client):  # type: ignore[type-arg]
    """A FastMCP client that calls tools as a client without MCP Tasks does. Once a process
    has imported fastmcp_tasks (collecting test_mcp_tasks.py does) every Client of the
    2026-07-28 era opts in, and a scan tool's call becomes a task the client waits out: its
    own answer (running at its timeout, the note on a reused result) would depend on the test
    modules collected. FastMCP's ProxyClient opts out the same way."""

    _auto_internal_extensions = False


OpenClient = Callable[..., contextlib.AbstractAsyncContextManager[Client]]


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a new empty profile, quit at the end."""
    with chromium(tmp_path) as driver:
        yield driver


@pytest.fixture
def in_memory(tmp_path: Path, nmap_wrapper: NmapWrapper) -> OpenClient:
    """In-memory MCP clients of create_server(...), for what the tools do: `async with
    in_memory("bob", **config) as bob:` calls the tools as token bob (its tool scopes, targets
    and limits apply: the server's stdio_caller), without HTTP or a secret. Its server runs its
    worker and scans with real nmap (the wrapper); the servers of one test share a SQLite
    database and an audit log (tmp_path/audit.jsonl), as processes of one service do. With
    `tasks=True` the client declares the MCP Tasks extension (fastmcp_tasks imported); with an
    `elicitation` handler it shows forms (elicitation), answered by the handler."""
    opened = itertools.count()

    @contextlib.asynccontextmanager
    async def open_client(caller: str = "alice", *, mode: str = "auto", tasks: bool = False,
                          elicitation: Callable[..., Awaitable[Any]] | None = None,
                          **overrides: object) -> AsyncIterator[Client]:
        index = next(opened)
        values = {"nmap_path": str(nmap_wrapper.path), "audit_log": str(tmp_path / "audit.jsonl"),
                  "worker_name": f"{caller}-{index}"} | overrides
        config = write_config(tmp_path / f"in-memory-{index}.json", stdio_caller=caller, **values)
        mcp, runtime = create_server(load_settings(config), str(values["nmap_path"]), role=Role.STDIO)
        kind = Client if tasks else ToolClient
        async with kind(mcp, mode=mode, elicitation_handler=elicitation) as client:  # type: ignore[arg-type]
            yield client
        assert runtime.supervisor.failure is None

    return open_client


@pytest.fixture
async def make_node(database_url: str, nmap_wrapper: NmapWrapper) -> AsyncIterator[MakeNode]:
    """Nodes (a process's stores and worker, see tests/nodes.py) on one database, running the
    test's nmap wrapper, stopped at teardown."""
    nodes: list[Node] = []

    async def make(**options: Any) -> Node:
        node = await start_node(database_url, f"w{len(nodes)}", nmap_wrapper, **options)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.stop()
    assert [node.supervisor.failure for node in nodes if node.supervisor.failure] == []
