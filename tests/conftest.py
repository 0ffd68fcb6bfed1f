"""Shared fixtures: loopback listeners, a recording nmap wrapper, databases, a live server.

Every scan in this suite targets 127.0.0.0/8 and asserts only on ports the test opened.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from tests.nodes import MakeNode, Node, start_node
from tests.support import POSTGRES_ADMIN_URL, Listeners, LiveServer, NmapWrapper, scratch_database, write_config

REAL_NMAP = shutil.which("nmap") or "/usr/bin/nmap"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test marked requires_root("what for") is skipped, saying what for, unless run as root."""
    if os.geteuid() == 0:
        return
    for item in items:
        if (needs := item.get_closest_marker("requires_root")) is not None:
            item.add_marker(pytest.mark.skip(reason=f"needs root: {needs.args[0]}"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def listeners() -> Iterator[Listeners]:
    opened = Listeners()
    yield opened
    opened.stop()


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
        f"open(os.path.join({str(starts)!r}, str(os.getpid())), 'x').close()\n"
        f"time.sleep(float(open({str(delay_file)!r}).read()))\n"
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


@pytest.fixture
async def make_node(database_url: str) -> AsyncIterator[MakeNode]:
    """Nodes (a process's stores and worker, see tests/nodes.py) on one database, stopped at teardown."""
    nodes: list[Node] = []

    async def make(**options: Any) -> Node:
        node = await start_node(database_url, f"w{len(nodes)}", **options)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        await node.stop()
    assert [node.supervisor.failure for node in nodes if node.supervisor.failure] == []
