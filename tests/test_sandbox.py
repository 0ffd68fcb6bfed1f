"""nmap's sandbox (sandbox.py, landlock_exec.py): a root server runs nmap as an unprivileged
user with only the raw-packet capabilities, reading system files only and writing nothing;
any other server runs nmap as itself. Real nmap, on this test's own loopback addresses."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

import landlock_exec
from sandbox import Sandbox, confinement, readable_paths
from scanner import NmapRun, build_argv, run_nmap
from server import has_raw_socket_capabilities, main
from tests.conftest import OpenClient
from tests.support import (
    ALICE,
    ROOT,
    Listeners,
    LiveServer,
    answer_of,
    call_tool,
    eventually,
    free_port,
    own_user_sandbox,
    process_alive,
    unprivileged,
    wait_until,
    write_config,
)

NMAP = shutil.which("nmap") or "/usr/bin/nmap"
# CAP_NET_BIND_SERVICE, CAP_NET_ADMIN and CAP_NET_RAW (bits 10, 12, 13), as /proc shows them.
RAW_PACKET_CAPS = f"{(1 << 10) | (1 << 12) | (1 << 13):016x}"
NEEDS_ROOT = "switching nmap to another user"
needs_landlock = pytest.mark.skipif(landlock_exec.abi_version() == 0, reason="this kernel has no Landlock")


def own_address() -> str:
    """A loopback address of this test's range, so that its nmap is told apart by its argv."""
    return f"127.46.{random.randint(1, 254)}.{random.randint(1, 254)}"


def proc_status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, value in (line.split(":", 1) for line in lines)}


def nmap_pid(target: str) -> int | None:
    """The running nmap (not a command of its sandbox) whose argv names `target`."""
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if entry.name.isdigit() and argv[0] == NMAP.encode() and target.encode() in argv:
                return int(entry.name)
    return None


@contextlib.asynccontextmanager
async def slow_scan(sandbox: Sandbox, *, privileged: bool) -> AsyncIterator[int]:
    """A scan of one address that takes minutes, under `sandbox`; yields its nmap's pid once
    nmap runs, and kills it afterwards."""
    target = own_address()
    argv = build_argv(NMAP, ["-sS" if privileged else "-sT", "-p", "1-100", "--scan-delay", "1s"], [target],
                      ipv6=False, privileged=privileged)
    scan = asyncio.create_task(run_nmap(argv, sandbox=sandbox.prefix, time_limit_s=300, xml_sink=lambda _: None,
                                        output_sink=lambda _: None))
    try:
        assert await eventually(lambda: nmap_pid(target) is not None, 30), "nmap did not start"
        pid = nmap_pid(target)
        assert pid is not None
        yield pid
    finally:
        scan.cancel()
        await asyncio.gather(scan, return_exceptions=True)


async def run_confined(sandbox: Sandbox, options: list[str]) -> tuple[NmapRun, str]:
    """One list scan (no packets sent) with extra options; how it ended and its XML."""
    out = bytearray()
    argv = build_argv(NMAP, ["-sL", *options], [own_address()], ipv6=False, privileged=False)
    run = await run_nmap(argv, sandbox=sandbox.prefix, time_limit_s=60, xml_sink=out.extend,
                         output_sink=lambda _: None)
    return run, out.decode()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may enter (tmp_path is root's alone), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="nmap-mcp-sandbox-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def test_a_configured_user_that_does_not_exist_stops_the_server_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "config.json", nmap_user="no-such-nmap-user")
    assert main(["-c", str(config)]) == 2
    error = capsys.readouterr().err
    assert "nmap_user 'no-such-nmap-user' does not exist on this machine" in error
    assert "useradd --system" in error


def test_a_server_that_is_not_root_runs_nmap_as_itself() -> None:
    """Unchanged for a server that is not root: setpriv (death with the server) and prlimit
    (no file writes) only, whatever nmap_user says (as root this runs as user nobody)."""
    probe = ("import json; from sandbox import confinement; print(json.dumps("
             "[confinement(user, privileged=True, nmap_path='nmap').prefix for user in (None, 'root')]))")
    ran = subprocess.run(unprivileged([sys.executable, "-c", probe]), cwd=ROOT, capture_output=True, text=True,
                         check=True)
    setpriv, prlimit = shutil.which("setpriv"), shutil.which("prlimit")
    unconfined = [setpriv, "--pdeathsig", "KILL", "--", prlimit, "--fsize=0", "--"]
    assert json.loads(ran.stdout) == [unconfined, unconfined]


def test_a_confined_nmap_may_read_where_an_nmap_installed_elsewhere_keeps_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "bin").mkdir()
    (tmp_path / "share" / "nmap").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    monkeypatch.setenv("NMAPDIR", str(tmp_path / "data"))
    paths = readable_paths(str(tmp_path / "bin" / "nmap"))
    assert paths[-3:] == [str(tmp_path / "bin"), str(tmp_path / "share" / "nmap"), str(tmp_path / "data")]
    assert "/usr" in paths and "/etc" in paths and "/proc/self" in paths
    assert readable_paths("/usr/bin/nmap") == readable_paths(NMAP), "nothing beneath /usr is listed twice"


@pytest.mark.requires_root(NEEDS_ROOT)
@pytest.mark.anyio
async def test_a_privileged_syn_scan_works_after_the_drop(in_memory: OpenClient, listeners: Listeners) -> None:
    target = own_address()
    port = free_port(target)
    assert listeners.open(port, target)
    async with in_memory(privileged=True, nmap_path=NMAP, nmap_user=None) as alice:
        answer = await answer_of(alice, "custom_scan", command=f"-sS -p {port} {target}", timeout=60)
        full = await answer_of(alice, "get_task_result", task_id=answer["task_id"], view="full")
    assert answer["status"] == "completed", answer
    [scanned] = full["result"]["hosts"][0]["ports"]
    assert (scanned["port"], scanned["state"], scanned["reason"]) == (port, "open", "syn-ack"), scanned


@pytest.mark.requires_root(NEEDS_ROOT)
@pytest.mark.anyio
@pytest.mark.parametrize(("privileged", "capabilities"), [(True, RAW_PACKET_CAPS), (False, "0" * 16)])
async def test_nmap_runs_as_the_unprivileged_user_with_only_the_capabilities_scans_need(
    privileged: bool, capabilities: str
) -> None:
    sandbox = confinement(None, privileged=privileged, nmap_path=NMAP)
    assert sandbox.user is not None and sandbox.user.uid != 0
    async with slow_scan(sandbox, privileged=privileged) as pid:
        status = proc_status(pid)
    user, group = str(sandbox.user.uid), str(sandbox.user.gid)
    assert status["Uid"].split() == [user] * 4 and status["Gid"].split() == [group] * 4
    assert status["Groups"] == ""
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == status["CapAmb"] == capabilities
    assert status["NoNewPrivs"] == "1"


@pytest.mark.requires_root(NEEDS_ROOT)
@pytest.mark.anyio
async def test_the_user_nmap_runs_as_is_the_configured_one() -> None:
    sandbox = confinement("daemon", privileged=False, nmap_path=NMAP)
    assert sandbox.user is not None and sandbox.user.name == "daemon"
    async with slow_scan(sandbox, privileged=False) as pid:
        assert proc_status(pid)["Uid"].split()[0] == str(sandbox.user.uid)
    assert confinement("root", privileged=False, nmap_path=NMAP).prefix == own_user_sandbox()


@pytest.mark.requires_root(NEEDS_ROOT)
@pytest.mark.anyio
@pytest.mark.parametrize(("directory_mode", "file_mode"), [
    (0o755, 0o600),  # a file of root's alone
    (0o700, 0o644),  # a file anyone may read, in a directory only root may enter (as in /root)
    pytest.param(0o755, 0o644, marks=needs_landlock),  # readable by every user: Landlock keeps nmap out
])
async def test_nmap_cannot_read_files_outside_the_system(shared_dir: Path, directory_mode: int, file_mode: int) -> None:
    """As root, nmap reads the target list a file holds (-iL); dropped, it cannot open it."""
    listed = own_address()
    secret = shared_dir / "inner" / "targets"
    secret.parent.mkdir()
    secret.write_text(f"{listed}\n")
    secret.chmod(file_mode)
    secret.parent.chmod(directory_mode)
    as_root, report = await run_confined(Sandbox(own_user_sandbox()), ["-iL", str(secret)])
    assert as_root.returncode == 0 and f'addr="{listed}"' in report, "the file is read without the drop"
    dropped, report = await run_confined(confinement(None, privileged=False, nmap_path=NMAP), ["-iL", str(secret)])
    assert dropped.returncode != 0 and f'addr="{listed}"' not in report
    assert b"Failed to open input file" in dropped.stderr


@pytest.mark.requires_root(NEEDS_ROOT)
@needs_landlock
@pytest.mark.anyio
async def test_nmap_cannot_create_files_even_where_every_user_may(shared_dir: Path) -> None:
    """The file-size limit stops writes, not the creation of empty files; Landlock stops both."""
    drop_box = shared_dir / "anyone"
    drop_box.mkdir()
    drop_box.chmod(0o1777)
    await run_confined(Sandbox(own_user_sandbox()), ["-oN", str(drop_box / "as-root")])
    assert (drop_box / "as-root").exists(), "without the drop nmap creates the file"
    dropped, _ = await run_confined(confinement(None, privileged=False, nmap_path=NMAP),
                                    ["-oN", str(drop_box / "dropped")])
    assert dropped.returncode != 0 and not (drop_box / "dropped").exists()


@pytest.mark.requires_root(NEEDS_ROOT)
def test_nmap_dies_with_the_server_after_the_drop() -> None:
    """setpriv's parent-death signal outlives its change of user: a server killed by SIGKILL
    takes its nmap along."""
    target = own_address()
    server = ("import asyncio, sys; from sandbox import confinement; from scanner import build_argv, run_nmap\n"
              f"argv = build_argv({NMAP!r}, ['-sT', '-p', '1-100', '--scan-delay', '1s'], [{target!r}], "
              "ipv6=False, privileged=False)\n"
              f"sandbox = confinement(None, privileged=False, nmap_path={NMAP!r}).prefix\n"
              "asyncio.run(run_nmap(argv, sandbox=sandbox, time_limit_s=300, xml_sink=len, output_sink=len))\n")
    process = subprocess.Popen([sys.executable, "-c", server], cwd=ROOT)
    try:
        assert wait_until(lambda: nmap_pid(target) is not None, 30), "nmap did not start"
        pid = nmap_pid(target)
        assert pid is not None and proc_status(pid)["Uid"].split()[0] != "0"
        os.kill(process.pid, signal.SIGKILL)
        assert wait_until(lambda: not process_alive(pid), 10), "nmap outlived its server"
    finally:
        process.kill()
        process.wait()


@pytest.mark.requires_root(NEEDS_ROOT)
def test_a_user_who_may_not_run_nmap_stops_the_server_at_start_up(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An nmap in a directory of root's alone (tmp_path) cannot run as nobody: the server says
    so at start-up rather than failing every scan."""
    stand_in = tmp_path / "nmap"
    stand_in.symlink_to(NMAP)
    config = write_config(tmp_path / "config.json", nmap_path=str(stand_in), nmap_user="nobody")
    assert main(["-c", str(config)]) == 2
    error = capsys.readouterr().err
    assert "nmap does not run as user nobody: " in error and "Permission denied" in error


@pytest.mark.server
@pytest.mark.requires_root("running the server as another user with the systemd drop-in's capabilities")
@pytest.mark.anyio
async def test_a_server_that_is_not_root_runs_syn_scans_with_the_drop_ins_ambient_capabilities(
    listeners: Listeners
) -> None:
    """deploy/privileged.conf gives the service CAP_NET_RAW and CAP_NET_ADMIN as ambient
    capabilities, which every nmap it starts inherits, and no setcap on nmap: the start-up
    check took that for no privileges and refused to start."""
    target = own_address()
    port = free_port(target)
    assert listeners.open(port, target)
    home = Path(tempfile.mkdtemp(prefix="nmap-mcp-ambient-"))
    try:
        home.chmod(0o777)
        config = write_config(home / "config.json", privileged=True, nmap_path=NMAP)
        config.chmod(0o644)
        # The server's code, where user nobody may go: a checkout under /root (mode 0700) is
        # reached with CAP_DAC_READ_SEARCH, which access(2) (Alembic checks its migrations with
        # it) does not honour. The venv's packages are read through that capability.
        code = home / "checkout"
        shutil.copytree(ROOT, code, ignore=shutil.ignore_patterns(".*", "tests", "bench", "__pycache__"))
        caps = "+net_raw,+net_admin,+dac_read_search"
        drop_in = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", f"--inh-caps={caps}",
                   f"--ambient-caps={caps}", sys.executable, str(code / "server.py"))
        server = LiveServer(config, home / "server.log", json.loads(config.read_text())["port"], program=drop_in)
        server.start()
        try:
            answer = (await call_tool(server.url, ALICE, "custom_scan",
                                      {"command": f"-sS -p {port} {target}", "timeout": 60})).structured_content
            full = (await call_tool(server.url, ALICE, "get_task_result",
                                    {"task_id": answer["task_id"], "view": "full"})).structured_content
        finally:
            server.stop()
    finally:
        shutil.rmtree(home)
    assert answer["status"] == "completed", answer
    [scanned] = full["result"]["hosts"][0]["ports"]
    assert (scanned["port"], scanned["state"], scanned["reason"]) == (port, "open", "syn-ack"), scanned


def test_raw_socket_capabilities_are_read_from_the_ambient_set() -> None:
    assert has_raw_socket_capabilities("Name:\tx\nCapAmb:\t0000000000003000\n")
    assert has_raw_socket_capabilities("CapAmb:\t0000000000003400\n")
    assert not has_raw_socket_capabilities("CapAmb:\t0000000000002000\n"), "CAP_NET_RAW alone is not enough"
    assert not has_raw_socket_capabilities("CapEff:\t0000000000003000\nCapAmb:\t0000000000000000\n")
    assert not has_raw_socket_capabilities("Name:\tx\n")
