"""run.sh, test.sh and scripts/with-postgres.sh on machines unlike this one: a PostgreSQL that
wants a password, a broken .venv, no root, no nmap, an old Python.

run.sh and test.sh run from a copy of the checkout, so the real .venv is never touched; every
PostgreSQL server a test starts is its own, on a free port with its socket in its own directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.support import (
    ROOT,
    START_UP_SECONDS,
    as_postgres,
    free_port,
    postgres_bindir,
    postgres_owns,
    postgres_socket_url,
    unprivileged,
)

# Every test runs a script, or a server of its own.
pytestmark = pytest.mark.server
# The PostgreSQL variables a developer's shell may carry; the scripts must not depend on them.
PG_VARIABLES = ("PGHOST", "PGPORT", "PGUSER", "PGPASSWORD", "PGDATABASE", "PGSERVICE", "NMAP_MCP_TEST_POSTGRES")
PROBE = """
import os, psycopg
with psycopg.connect(os.environ["NMAP_MCP_TEST_POSTGRES"], autocommit=True) as conn:
    conn.execute("CREATE DATABASE probe")
    print(conn.execute("SHOW data_directory").fetchone()[0])
"""


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory under /tmp that users postgres and nobody can reach (pytest's tmp_path is 0700)."""
    directory = Path(tempfile.mkdtemp(prefix="nmap-mcp-test.", dir="/tmp"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


@pytest.fixture
def password_postgres(shared_dir: Path) -> Iterator[tuple[Path, int]]:
    """A server of this test's own that asks everyone, user postgres too, for a password:
    yields its socket directory and port (it also listens on 127.0.0.1 at that port)."""
    yield from run_postgres(shared_dir, "scram-sha-256")


@pytest.fixture
def trusting_postgres(shared_dir: Path) -> Iterator[tuple[Path, int]]:
    """A server of this test's own that lets user postgres in over its socket without a password."""
    yield from run_postgres(shared_dir, "trust")


def run_postgres(directory: Path, auth: str) -> Iterator[tuple[Path, int]]:
    """Run a server (as user postgres when we are root) with its data and socket in directory, until closed."""
    postgres_owns(directory)
    pg_ctl, data, port = str(postgres_bindir() / "pg_ctl"), directory / "data", free_port()
    initdb = [str(postgres_bindir() / "initdb"), "-D", str(data), "-U", "postgres", f"--auth={auth}"]
    initdb += ["--no-sync", "--no-locale", "-E", "UTF8"]
    if auth != "trust":
        (directory / "password").write_text("a-password-the-scripts-do-not-know\n")
        initdb += ["--pwfile", str(directory / "password")]
    as_postgres(initdb, directory)
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(f"listen_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{directory}'\n")
    as_postgres([pg_ctl, "-D", str(data), "-l", str(directory / "log"), "-w", "start"], directory)
    try:
        yield directory, port
    finally:
        as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], directory)


def still_running(directory: Path) -> bool:
    """Whether the server run_postgres started in directory is still up."""
    status = [str(postgres_bindir() / "pg_ctl"), "-D", str(directory / "data"), "status"]
    return as_postgres(status, directory, check=False).returncode == 0


def with_postgres(socket_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    """scripts/with-postgres.sh running PROBE, told that the machine's server is at socket_dir:port."""
    env = {k: v for k, v in os.environ.items() if k not in PG_VARIABLES}
    env |= {"PGHOST": str(socket_dir), "PGPORT": str(port)}
    argv = [str(ROOT / "scripts/with-postgres.sh"), sys.executable, "-c", PROBE]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, check=False)


def test_the_machines_server_is_used_as_it_is_when_postgres_gets_in(trusting_postgres: tuple[Path, int]) -> None:
    socket_dir, port = trusting_postgres
    ran = with_postgres(socket_dir, port)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == f"using PostgreSQL at {socket_dir} (port {port}) as user postgres\n"
    assert ran.stdout.strip() == str(socket_dir / "data")
    assert still_running(socket_dir), "the machine's server must be left running"


def test_a_server_that_wants_a_password_gives_way_to_a_private_cluster(password_postgres: tuple[Path, int]) -> None:
    socket_dir, port = password_postgres
    ran = with_postgres(socket_dir, port)
    assert ran.returncode == 0, ran.stderr
    [line] = ran.stderr.splitlines()
    assert line.startswith("started a private PostgreSQL cluster at /tmp/nmap-mcp-pg.")
    assert f"the machine's server at {socket_dir} (port {port}) is not usable" in line
    assert "password" in line
    cluster = Path(line.split(" at ", 1)[1].split(" ", 1)[0])
    assert ran.stdout.strip() == str(cluster / "data")
    assert not cluster.exists(), "the private cluster is deleted when the command ends"
    assert still_running(socket_dir), "the machine's server must be left running"


@pytest.mark.postgres
def test_the_socket_url_reaches_the_test_server() -> None:
    with psycopg.connect(postgres_socket_url("postgres")) as conn:
        assert conn.execute("SELECT inet_server_addr() IS NULL").fetchone() == (True,)


def copy_checkout(destination: Path) -> Path:
    """The checkout's files (tracked, or new and not ignored) copied to destination/checkout."""
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True, text=True, check=True,
    ).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (destination / "checkout" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / "checkout" / name)
    return destination / "checkout"


def test_run_sh_rebuilds_a_venv_that_is_broken_or_half_installed(tmp_path: Path) -> None:
    checkout = copy_checkout(tmp_path)
    (checkout / ".venv/bin").mkdir(parents=True)
    (checkout / ".venv/bin/python").symlink_to("/nonexistent/python3")
    # Without an index pip fails, as an install cut short would: the next run must not trust .venv.
    offline = os.environ | {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(tmp_path)}
    failed = subprocess.run(
        [checkout / "run.sh", "--help"], env=offline, capture_output=True, text=True, timeout=120, check=False
    )
    assert failed.returncode != 0 and "rebuilding .venv" in failed.stderr
    assert (checkout / ".venv/.incomplete").exists()

    rebuilt = subprocess.run([checkout / "run.sh", "--help"], capture_output=True, text=True, timeout=600, check=False)
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert "rebuilding .venv" in rebuilt.stderr and "usage: server.py" in rebuilt.stdout
    assert not (checkout / ".venv/.incomplete").exists()

    again = subprocess.run([checkout / "run.sh", "--help"], capture_output=True, text=True, timeout=START_UP_SECONDS,
                           check=False)
    assert again.returncode == 0 and again.stderr == "", "an unchanged, working .venv is used as it is"


def path_without(shared_dir: Path, hidden: set[str]) -> str:
    """A PATH of one directory linking every program of the usual ones but the hidden, plus an
    apt-get that only says it ran."""
    bin_dir = shared_dir / "bin"
    bin_dir.mkdir()
    for directory in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        for program in Path(directory).iterdir() if Path(directory).is_dir() else ():
            link = bin_dir / program.name
            if program.name not in hidden and not link.exists() and not link.is_symlink():
                link.symlink_to(program)
    (bin_dir / "apt-get").write_text("#!/bin/sh\necho 'apt-get was started' >&2\nexit 1\n")
    (bin_dir / "apt-get").chmod(0o755)
    return str(bin_dir)


@pytest.mark.parametrize("script", ["run.sh", "test.sh"])
def test_without_root_a_missing_nmap_stops_at_once_naming_what_to_install(shared_dir: Path, script: str) -> None:
    checkout = copy_checkout(shared_dir)
    env = {"PATH": path_without(shared_dir, {"nmap", "apt-get"}), "HOME": "/nonexistent"}
    started = time.monotonic()
    ran = subprocess.run(unprivileged([str(checkout / script)]), env=env, capture_output=True, text=True, timeout=30,
                         check=False)
    assert time.monotonic() - started < 10
    assert ran.returncode == 1
    advice = re.search(r"missing .*\. Install with: sudo apt-get install -y ([\w.+ -]+?) \(or rerun", ran.stderr)
    assert advice is not None, ran.stderr
    assert "nmap" in advice.group(1).split()
    assert "apt-get was started" not in ran.stderr
    assert not (checkout / ".venv").exists()


def test_the_fast_tier_asks_for_nmap_but_for_no_postgresql_or_chromium(shared_dir: Path) -> None:
    """./test.sh --fast runs on a laptop with python3 and nmap: without root, what it asks to
    install is nmap alone, where the whole suite asks for PostgreSQL and Chromium too."""
    checkout = copy_checkout(shared_dir)
    env = {"PATH": path_without(shared_dir, {"nmap", "psql", "chromium", "chromedriver", "apt-get"}),
           "HOME": "/nonexistent"}

    def advice(*args: str) -> list[str]:
        ran = subprocess.run(unprivileged([str(checkout / "test.sh"), *args]), env=env, capture_output=True,
                             text=True, timeout=30, check=False)
        assert ran.returncode == 1
        found = re.search(r"missing .*\. Install with: sudo apt-get install -y ([\w.+ -]+?) \(or rerun", ran.stderr)
        assert found is not None, ran.stderr
        return found.group(1).split()

    assert {"nmap", "postgresql", "chromium", "chromium-driver"} <= set(advice())
    assert advice("--fast") == ["nmap"]
    assert not (checkout / ".venv").exists()


def test_the_ui_screenshot_script_without_root_asks_for_chromium_and_touches_nothing(shared_dir: Path) -> None:
    """scripts/ui-screenshot.sh (which refreshes the README's picture of /ui) needs the browser
    test's Chromium: without root it names the packages and leaves .venv and the image alone."""
    checkout = copy_checkout(shared_dir)
    image = (checkout / "docs/images/ui.png").read_bytes()
    env = {"PATH": path_without(shared_dir, {"chromium", "chromedriver", "apt-get"}), "HOME": "/nonexistent"}
    ran = subprocess.run(unprivileged([str(checkout / "scripts/ui-screenshot.sh")]), env=env, capture_output=True,
                         text=True, timeout=30, check=False)
    assert ran.returncode == 1
    advice = re.search(r"missing .*\. Install with: sudo apt-get install -y ([\w.+ -]+?) \(or rerun", ran.stderr)
    assert advice is not None, ran.stderr
    assert advice.group(1).split() == ["chromium", "chromium-driver"]
    assert not (checkout / ".venv").exists()
    assert (checkout / "docs/images/ui.png").read_bytes() == image


@pytest.mark.requires_root("test.sh installs packages only as root")
def test_as_root_test_sh_installs_iproute2_for_the_tests_that_need_root(shared_dir: Path) -> None:
    """A fresh Debian root has no `ip`, which the network-namespace tests run."""
    checkout = copy_checkout(shared_dir)
    # No index: should test.sh go on to build .venv, pip fails at once instead of installing.
    env = {"PATH": path_without(shared_dir, {"ip", "apt-get"}), "HOME": "/nonexistent", "PIP_NO_INDEX": "1"}
    ran = subprocess.run([checkout / "test.sh"], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert ran.returncode != 0
    assert re.search(r"^installing (.* )?iproute2( .*)? with apt-get$", ran.stderr, flags=re.MULTILINE), ran.stderr
    assert "apt-get was started" in ran.stderr


@pytest.mark.parametrize("script", ["run.sh", "test.sh"])
def test_a_python_older_than_3_11_is_refused_by_name(tmp_path: Path, script: str) -> None:
    checkout = copy_checkout(tmp_path)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin/python3").write_text("#!/bin/sh\necho 'Python 3.9.18'\n")
    (tmp_path / "bin/python3").chmod(0o755)
    env = os.environ | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    ran = subprocess.run([checkout / script], env=env, capture_output=True, text=True, timeout=30, check=False)
    assert ran.returncode == 1
    assert ran.stderr == f"nmap-mcp needs Python 3.11 or newer, but {tmp_path / 'bin/python3'} is: Python 3.9.18\n"
    assert not (checkout / ".venv").exists()
